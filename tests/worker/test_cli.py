"""The synthguard command: scan on SQLite (the pipeline), listings, show, demo, db upgrade, enqueue."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from db.session import make_engine
from db.tables import EXTERNAL_ID_MAX_LEN, Check, Verdict
from tests.images import photo_bytes
from worker.cli import main
from worker.cli.pipeline_cmds import bounded_external_id


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    (folder / "nested").mkdir(parents=True)
    (folder / "one.png").write_bytes(photo_bytes("astronaut.png", offset=70))
    (folder / "nested" / "two.jpg").write_bytes(photo_bytes("coffee.png", offset=80, image_format="JPEG"))
    (folder / "notes.txt").write_text("not an image, and not collected from a directory")
    return folder


def test_scan_runs_the_pipeline_on_sqlite_and_is_idempotent(tmp_path, images):
    db_path = tmp_path / "scan.db"
    not_an_image = tmp_path / "fake.png"
    not_an_image.write_bytes(b"\x89PNG but truncated")

    first = run("scan", str(images), str(not_an_image), "--db", str(db_path), "--format", "json")
    assert first.exit_code == 0, first.output
    rows = {Path(row["input"]).name: row for row in json.loads(first.stdout)}
    assert set(rows) == {"one.png", "two.jpg", "fake.png"}
    assert rows["one.png"]["status"] == "done" and rows["one.png"]["verdict"] in (
        "generated",
        "real",
        "uncertain",
    )
    assert rows["two.jpg"]["status"] == "done"
    assert rows["fake.png"]["status"] == "failed" and rows["fake.png"]["error"].startswith("not analysable")

    second = run("scan", str(images), "--db", str(db_path), "--format", "json")
    again = {Path(row["input"]).name: row for row in json.loads(second.stdout)}
    assert again["one.png"]["check_id"] == rows["one.png"]["check_id"]  # the same check, not a new one
    engine = make_engine(f"sqlite:///{db_path}")
    with engine.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(Verdict)) == 2
        assert connection.scalar(sa.select(sa.func.count()).select_from(Check)) == 3
    engine.dispose()


def test_scan_table_and_listings(tmp_path, images):
    db_path = str(tmp_path / "list.db")
    table = run("scan", str(images / "one.png"), "--db", db_path)
    assert table.exit_code == 0
    header = table.stdout.splitlines()[0].split()
    assert header[:5] == ["INPUT", "STATUS", "VERDICT", "SCORE", "DECIDED_BY"]

    listed = json.loads(run("verdicts", "--db", db_path, "--format", "json").stdout)
    assert len(listed) == 1
    assert {"check_id", "external_id", "client", "sha256", "verdict", "score", "model"} <= set(listed[0])
    assert listed[0]["client"] == "scan"

    assert json.loads(run("verdicts", "--db", db_path, "--client", "nobody", "--format", "json").stdout) == []
    assert json.loads(run("verdicts", "--db", db_path, "--since", "1h", "--format", "json").stdout) != []
    flagged = json.loads(run("verdicts", "--db", db_path, "--flagged", "--format", "json").stdout)
    assert all(row["verdict"] == "generated" for row in flagged)

    done = json.loads(run("checks", "--db", db_path, "--status", "done", "--format", "json").stdout)
    assert [row["check_id"] for row in done] == [listed[0]["check_id"]]
    assert json.loads(run("checks", "--db", db_path, "--status", "failed", "--format", "json").stdout) == []

    shown = run("show", listed[0]["check_id"], "--db", db_path)
    assert shown.exit_code == 0
    for text in ("verdict", "evidence", "spectral", "color", "grid", listed[0]["sha256"]):
        assert text in shown.stdout
    details = json.loads(run("show", listed[0]["check_id"], "--db", db_path, "--format", "json").stdout)
    assert {"spectral", "color", "grid"} <= set(details["evidence"])
    assert details["created_at"].endswith("+00:00")


def test_listings_say_when_they_stop_at_the_limit(tmp_path):
    """A reviewer working through a day's flagged checks must not believe the first page was all of them."""
    from db.session import make_session_factory, session_scope
    from tests.worker.webhook_helpers import add_checked_image
    from worker import outbox

    db_path = str(tmp_path / "many.db")
    assert run("db", "upgrade", "--db", db_path).exit_code == 0
    engine = make_engine(f"sqlite:///{db_path}")
    with session_scope(make_session_factory(engine)) as session:
        for _ in range(3):
            check, verdict = add_checked_image(session, callback_url="https://example.com/cb")
            outbox.record_check_events(session, check, verdict)
    engine.dispose()
    notice = "showing the newest 2; more match"
    for command in (["verdicts", "--flagged"], ["checks"]):
        cut = run(*command, "--db", db_path, "--limit", "2", "--format", "json")
        assert len(json.loads(cut.stdout)) == 2 and notice in cut.stderr
        whole = run(*command, "--db", db_path, "--limit", "3", "--format", "json")
        assert len(json.loads(whole.stdout)) == 3 and whole.stderr == ""
        assert notice in run(*command, "--db", db_path, "--limit", "2").stderr  # the table too
    env = {"SYNTHGUARD_DATABASE_URL": f"sqlite:///{db_path}"}
    cut = run("webhooks", "deliveries", "--limit", "2", "--format", "json", env=env)
    assert len(json.loads(cut.stdout)) == 2 and notice in cut.stderr
    whole = run("webhooks", "deliveries", "--limit", "3", env=env)
    assert "showing the newest" not in whole.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # An unescaped '/' in a password: Python's URL parser reads "hunter" as the port; kombu's own error
        # repeated it (a traceback, in a crash-looping container's log).
        ("SYNTHGUARD_BROKER_URL", "redis://:hunter/2@localhost:6379/0"),
        ("SYNTHGUARD_BROKER_URL", "redis://localhost:63x79/0"),
        ("SYNTHGUARD_ALLOW_PRIVATE_HOSTS", "10.0.0.0/8,hunter2 secret"),
        # Unescaped ':' and '@' in a password: SQLAlchemy's port parser repeated "hunter2Secret@db.internal".
        ("SYNTHGUARD_DATABASE_URL", "postgresql+psycopg://synth:pa@ss:hunter2Secret@db.internal/synth"),
    ],
)
def test_settings_errors_are_one_line_that_never_echoes_the_value(tmp_path, variable, value):
    for command in (["checks", "--db", str(tmp_path / "x.db")], ["enqueue", str(tmp_path)]):
        result = run(*command, env={variable: value})
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert variable in result.stderr
        assert "hunter" not in result.stderr and "63x79" not in result.stderr


def test_listings_refuse_an_unmigrated_database_with_one_line(tmp_path):
    missing = tmp_path / "typo.db"
    for command in (["checks"], ["verdicts"], ["show", str(uuid.uuid4())]):
        result = run(*command, "--db", str(missing))
        assert result.exit_code == 1
        assert f"no database at {missing}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not missing.exists()  # a read never leaves an empty database behind

    env = {"SYNTHGUARD_DATABASE_URL": f"sqlite:///{missing}"}
    for command in (["webhooks", "list"], ["webhooks", "deliveries"]):
        result = run(*command, env=env)
        assert result.exit_code == 1 and f"no database at {missing}" in result.stderr
        assert not missing.exists()

    # SQLite's URI form (a read-only view of a live database) names a file that exists.
    assert run("db", "upgrade", "--db", str(tmp_path / "live.db")).exit_code == 0
    read_only = run("checks", "--db", f"sqlite:///file:{tmp_path / 'live.db'}?mode=ro&uri=true")
    assert read_only.exit_code == 0 and read_only.stdout.strip() == "(none)"

    (tmp_path / "empty.db").touch()
    result = run("checks", "--db", str(tmp_path / "empty.db"))
    assert result.exit_code == 1
    assert "run `synthguard db upgrade`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    upgraded = run("db", "upgrade", "--db", str(tmp_path / "empty.db"))
    assert upgraded.exit_code == 0 and "current schema" in upgraded.stdout
    assert run("checks", "--db", str(tmp_path / "empty.db")).stdout.strip() == "(none)"


# OSC sequences: click.echo strips CSI ones ("\x1b[2J") from output that is not a terminal, but not these.
HOSTILE_EXTERNAL_ID = "up-1\x1b]0;pwned\x07"  # retitles the operator's terminal window
HOSTILE_CLIENT = "acme\x1b]52;c;cm0gLXJmIH4K\x07"  # writes "rm -rf ~" to the clipboard (OSC 52)


def test_tables_escape_control_characters_from_tenants_and_json_keeps_them(tmp_path):
    """External ids and client names are chosen by tenants; printed raw, their escape sequences act on the
    operator's terminal. Tables show them escaped; JSON (escaped by json.dumps) keeps the exact text."""
    from db.session import make_session_factory, session_scope
    from tests.worker.webhook_helpers import add_checked_image

    db_path = str(tmp_path / "hostile.db")
    assert run("db", "upgrade", "--db", db_path).exit_code == 0
    engine = make_engine(f"sqlite:///{db_path}")
    with session_scope(make_session_factory(engine)) as session:
        check, _ = add_checked_image(session, client=HOSTILE_CLIENT)
        check.external_id = HOSTILE_EXTERNAL_ID
        check_id = str(check.id)
    engine.dispose()
    note = "looks fine\x1b]0;approved\x07"
    reviewed = run(
        "review", check_id, "--verdict", "real", "--reviewer", "alice", "--note", note, "--db", db_path
    )
    assert reviewed.exit_code == 0, reviewed.output

    for command in (["checks"], ["verdicts"], ["show", check_id], ["review", check_id, "--verdict", "real",
                    "--reviewer", "alice"], ["clients", "list"]):  # fmt: skip
        table = run(*command, "--db", db_path)
        assert table.exit_code == 0, table.output
        assert "\x1b" not in table.output and "\x07" not in table.output, command
        assert "\\x1b]" in table.stdout, command  # shown, escaped, rather than dropped
    shown = run("show", check_id, "--db", db_path).stdout
    assert "up-1\\x1b]0;pwned\\x07" in shown and "looks fine\\x1b]0;approved\\x07" in shown

    (listed,) = json.loads(run("checks", "--db", db_path, "--format", "json").stdout)
    assert (listed["external_id"], listed["client"]) == (HOSTILE_EXTERNAL_ID, HOSTILE_CLIENT)
    (verdict,) = json.loads(run("verdicts", "--db", db_path, "--format", "json").stdout)
    assert verdict["external_id"] == HOSTILE_EXTERNAL_ID
    details = json.loads(run("show", check_id, "--db", db_path, "--format", "json").stdout)
    assert details["external_id"] == HOSTILE_EXTERNAL_ID and details["reviews"][0]["note"] == note
    assert [
        row["client"]
        for row in json.loads(run("clients", "list", "--db", db_path, "--format", "json").stdout)
    ] == [HOSTILE_CLIENT]


def test_show_rejects_unknown_ids(tmp_path):
    db_path = str(tmp_path / "show.db")
    run("db", "upgrade", "--db", db_path)
    assert run("show", "nope", "--db", db_path).exit_code == 2
    missing = run("show", "00000000-0000-0000-0000-000000000000", "--db", db_path)
    assert missing.exit_code == 1 and "no check" in missing.stderr


def test_demo_writes_labelled_examples_and_scans_them(tmp_path):
    images_dir = tmp_path / "demo-images"
    result = run(
        "demo", "--db", str(tmp_path / "demo.db"), "--images-dir", str(images_dir), "--format", "json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {row["input"] for row in rows} >= {"astronaut.png", "coffee-8x-nearest.png", "rocket.jpg"}
    assert all(row["status"] == "done" for row in rows), [row["error"] for row in rows]
    labels = {row["input"]: row["what it is"] for row in rows}
    assert labels["astronaut.png"].startswith("camera photo")
    assert labels["coffee-8x-nearest.png"].startswith("made here")
    assert sorted(path.name for path in images_dir.iterdir()) == sorted(labels)


def test_a_directory_scan_names_the_files_it_leaves_out(tmp_path, images):
    (images / "nested" / "three.apng").write_bytes(photo_bytes("chelsea.png", offset=85))
    result = run("scan", str(images), "--db", str(tmp_path / "scan.db"), "--format", "json")
    assert result.exit_code == 0, result.output
    assert {Path(row["input"]).name for row in json.loads(result.stdout)} == {
        "one.png",
        "two.jpg",
        "three.apng",
    }
    assert "skipped 1 file(s) without an image suffix (notes.txt)" in result.stderr


def test_scan_refuses_missing_paths(tmp_path):
    result = run("scan", str(tmp_path / "missing.png"), "--db", str(tmp_path / "x.db"))
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_long_ids_are_hashed_whole_and_short_ids_keep_their_form():
    tail = "/" + "x" * EXTERNAL_ID_MAX_LEN + ".png"
    first = bounded_external_id("url", f"https://cdn-one.example{tail}")
    second = bounded_external_id("url", f"https://cdn-two.example{tail}")
    assert first != second
    assert first.startswith("url-sha256:") and len(first) == len("url-sha256:") + 64
    assert first == bounded_external_id("url", f"https://cdn-one.example{tail}")  # stable
    assert bounded_external_id("file", f"/{'d' * 300}/a.png@0123").startswith("file-sha256:")
    assert bounded_external_id("url", "https://example.com/a.png") == "url:https://example.com/a.png"


def test_scan_keeps_long_urls_that_differ_early_apart(tmp_path, httpserver):
    tail = "/" + "x" * EXTERNAL_ID_MAX_LEN + ".png"
    for prefix, offset in (("/a", 70), ("/b", 80)):
        httpserver.expect_request(prefix + tail).respond_with_data(
            photo_bytes("astronaut.png", offset=offset), content_type="image/png"
        )
    urls = [httpserver.url_for("/a" + tail), httpserver.url_for("/b" + tail)]
    env = {"SYNTHGUARD_ALLOW_PRIVATE_HOSTS": "127.0.0.1,localhost"}
    db_path = tmp_path / "urls.db"
    result = run("scan", *urls, "--db", str(db_path), "--format", "json", env=env)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["status"] for row in rows] == ["done", "done"], [row["error"] for row in rows]
    assert rows[0]["check_id"] != rows[1]["check_id"]
    assert rows[0]["sha256"] != rows[1]["sha256"]  # each check got its own image
    assert len(httpserver.log) == 2
    engine = make_engine(f"sqlite:///{db_path}")
    with engine.connect() as connection:
        stored = connection.scalars(sa.select(Check.external_id)).all()
    engine.dispose()
    assert sorted(stored) == sorted(bounded_external_id("url", url) for url in urls)


def test_a_database_file_that_is_not_sqlite_is_refused_with_one_line(tmp_path):
    not_a_db = tmp_path / "notadb.txt"
    not_a_db.write_text("just some notes, not a database\n" * 100)
    for command in (("checks",), ("db", "upgrade")):
        result = run(*command, "--db", str(not_a_db))
        assert result.exit_code == 1, result.output
        assert "file is not a database" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_scan_refuses_a_list_file_that_is_not_utf8_text(tmp_path):
    binary = tmp_path / "photo.lst"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x80binary")
    result = run("scan", f"@{binary}", "--db", str(tmp_path / "x.db"))
    assert result.exit_code == 2
    assert f"list file {binary} is not a UTF-8 text list" in result.stderr
    assert not (tmp_path / "x.db").exists()  # refused before the database is opened


def test_listings_refuse_an_age_before_year_one(tmp_path):
    db_path = str(tmp_path / "since.db")
    run("db", "upgrade", "--db", db_path)
    for command in ("verdicts", "checks"):
        result = run(command, "--since", "1000000d", "--db", db_path)
        assert result.exit_code == 2
        assert "Invalid value for --since: an age of 1000000 days reaches before year 1" in result.stderr


@pytest.mark.parametrize(
    ("callback_url", "reason"),
    [
        ("ftp://example.com/hook", "http"),
        ("https://example.com:22/hook", "port"),
        ("https://user:password@example.com/hook", "user"),
    ],
)
def test_enqueue_refuses_a_callback_url_the_task_would_refuse(tmp_path, callback_url, reason):
    """Stored, such a URL failed every check.flagged delivery silently (and kept the password)."""
    (tmp_path / "a.png").write_bytes(photo_bytes("chelsea.png", offset=90))
    db_path = tmp_path / "cb.db"
    result = run("enqueue", str(tmp_path / "a.png"), "--callback-url", callback_url, "--db", str(db_path))
    assert result.exit_code == 2
    assert "--callback-url" in result.stderr and reason in result.stderr.lower()
    assert "password" not in result.stderr
    assert not db_path.exists()  # refused before anything was recorded


def test_enqueue_reaches_a_real_worker(celery_worker, settings, pg_session_factory, tmp_path):
    (tmp_path / "a.png").write_bytes(photo_bytes("chelsea.png", offset=90))
    (tmp_path / "b.png").write_bytes(photo_bytes("chelsea.png", offset=95))
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.png'}\n# a comment\n{tmp_path / 'b.png'}\n")
    env = {
        "SYNTHGUARD_DATABASE_URL": settings.database_url,
        "SYNTHGUARD_BROKER_URL": settings.broker_url,
        "SYNTHGUARD_QUEUE_NAME": settings.queue_name,
    }
    result = run("enqueue", f"@{tmp_path / 'list.txt'}", "--client", "cli-test", "--format", "json", env=env)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["status"] for row in rows] == ["queued", "queued"]
    ids = {row["check_id"] for row in rows}

    deadline = time.monotonic() + 180
    statuses: dict[str, Any] = {}
    while time.monotonic() < deadline:
        listed = json.loads(run("checks", "--format", "json", env=env).stdout)
        statuses = {row["check_id"]: row["status"] for row in listed if row["check_id"] in ids}
        if set(statuses.values()) <= {"done", "failed"} and len(statuses) == 2:
            break
        time.sleep(0.3)
    assert set(statuses.values()) == {"done"}, statuses

    # Enqueuing the same files again prints the same checks and queues nothing new.
    again = json.loads(run("enqueue", str(tmp_path / "a.png"), "--client", "cli-test", "--format", "json",
                           env=env).stdout)  # fmt: skip
    assert again[0]["check_id"] in ids and again[0]["status"] == "done"


def _worker_env(settings, queue: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SYNTHGUARD_")}
    env.update(
        SYNTHGUARD_DATABASE_URL=settings.database_url,
        SYNTHGUARD_BROKER_URL=settings.broker_url,
        SYNTHGUARD_QUEUE_NAME=queue,
        SYNTHGUARD_SECRET_KEY=settings.require_secret_key(),
        SYNTHGUARD_ALLOW_PRIVATE_HOSTS=settings.allow_private_hosts,
    )
    return env


def test_worker_command_runs_prefork_children_and_stops_on_sigterm(settings, pg_session_factory, tmp_path):
    """`synthguard worker` as deployed: the parent never runs torch; forked children load the detector."""
    from worker.client import submit_check

    queue = f"synthguard-cli-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from worker.cli import main; main()", "worker", "--concurrency=1"],
            env=_worker_env(settings, queue),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        submit_check(settings.broker_url, queue=queue, client="prefork", external_id="p1",
                     image_bytes=photo_bytes("astronaut.png", offset=150))  # fmt: skip
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline and status not in ("done", "failed"):
            time.sleep(0.5)
            assert process.poll() is None, log_path.read_text()
            with pg_session_factory() as session:
                status = session.scalar(
                    sa.select(Check.status).where(Check.client == "prefork", Check.external_id == "p1")
                )
        assert status == "done", log_path.read_text()[-3000:]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("the worker did not stop within 60 s of SIGTERM")
    assert "Traceback" not in log_path.read_text()


def test_worker_command_refuses_a_detector_it_cannot_load(settings, tmp_path):
    env = _worker_env(settings, "unused")
    env["SYNTHGUARD_MODEL_NAME"] = "no-such-detector"
    result = subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "cannot load detector no-such-detector" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def _run_worker(env: dict[str, str]) -> Result:
    """`synthguard worker` in this process, with a detector that does not exist: every start stops at the
    detector check at the latest, so none of these tests starts a worker."""
    return run("worker", env={**env, "SYNTHGUARD_MODEL_NAME": "no-such-detector"})


@pytest.mark.usefixtures("pg_clean")
@pytest.mark.parametrize("stored", ["endpoint", "client secret"])
def test_worker_refuses_a_key_that_does_not_decrypt_the_stored_secrets(settings, stored):
    """With another key a worker would start "ready" and fail every delivery it takes, for good."""
    right = _worker_env(settings, "unused")
    wrong_key = secrets.token_hex(32)
    wrong = {**right, "SYNTHGUARD_SECRET_KEY": wrong_key}
    passed_key_check = "checking detector no-such-detector"

    empty = _run_worker(wrong)  # nothing stored yet: there is nothing a key could fail to decrypt
    assert empty.exit_code == 1 and passed_key_check in empty.stderr, empty.output

    if stored == "endpoint":
        made = run("webhooks", "add", "https://hooks.example.com/in", "--client", "acme", env=right)
    else:  # created on first use; signs callback_url deliveries
        made = run("webhooks", "client-secret", "acme", env=right)
    assert made.exit_code == 0, made.output

    refused = _run_worker(wrong)
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines() == [
        "Error: SYNTHGUARD_SECRET_KEY does not decrypt the stored webhook secrets; set the key they were "
        "stored with, or keep it in SYNTHGUARD_SECRET_KEY_FALLBACKS beside a new key (every worker and "
        "`synthguard webhooks` command needs the same keys)"
    ]
    assert wrong_key not in refused.output and settings.require_secret_key() not in refused.output

    # The right key with a secret file's newline: refused by the settings, before the database is read.
    newline = _run_worker({**right, "SYNTHGUARD_SECRET_KEY": settings.require_secret_key() + "\n"})
    assert newline.exit_code == 1
    assert newline.stderr.strip().splitlines() == [
        "Error: invalid settings: SYNTHGUARD_SECRET_KEY: has leading or trailing whitespace "
        "(the newline of a secret file?); remove it (every process must use the same key)"
    ]

    started = _run_worker(right)
    assert passed_key_check in started.stderr and "does not decrypt" not in started.stderr, started.output


@pytest.mark.usefixtures("pg_clean")
def test_a_key_change_with_the_old_key_as_fallback_then_rekey(settings):
    """The documented key change: new key, the old one as fallback, workers restart, rekey, fallback gone."""
    old = _worker_env(settings, "unused")
    new_key = secrets.token_hex(32)
    changed = {
        **old,
        "SYNTHGUARD_SECRET_KEY": new_key,
        "SYNTHGUARD_SECRET_KEY_FALLBACKS": old["SYNTHGUARD_SECRET_KEY"],
    }
    new_only = {**old, "SYNTHGUARD_SECRET_KEY": new_key}
    made = run("webhooks", "add", "https://hooks.example.com/in", "--client", "acme", env=old)
    assert made.exit_code == 0, made.output
    assert run("webhooks", "client-secret", "acme", env=old).exit_code == 0
    reminder = "warning: webhook secrets are stored under a key in SYNTHGUARD_SECRET_KEY_FALLBACKS"

    during = _run_worker(changed)
    assert "checking detector no-such-detector" in during.stderr and reminder in during.stderr, during.output
    assert "does not decrypt" in _run_worker(new_only).stderr  # without the fallback: refused, as before

    rekeyed = run("webhooks", "rekey", env=changed)
    assert rekeyed.exit_code == 0, rekeyed.output
    assert rekeyed.stdout.strip() == "2 secret(s) re-encrypted under SYNTHGUARD_SECRET_KEY, 0 already were"
    assert "SYNTHGUARD_SECRET_KEY_FALLBACKS can be removed" in rekeyed.stderr

    after = _run_worker(new_only)
    assert "checking detector no-such-detector" in after.stderr, after.output
    assert "does not decrypt" not in after.stderr and reminder not in after.stderr
    assert run("webhooks", "client-secret", "acme", env=new_only).exit_code == 0

    # A secret under a key that is nowhere in the settings: named, left alone, exit status 1.
    lost = run("webhooks", "rekey", env={**old, "SYNTHGUARD_SECRET_KEY": secrets.token_hex(32)})
    assert lost.exit_code == 1
    assert "2 secret(s) decrypt under none of the keys and were left as they were: endpoint " in lost.stderr
    assert "client acme" in lost.stderr and new_key not in lost.output


@pytest.mark.usefixtures("pg_clean")
@pytest.mark.timeout(180)  # reading the worker's output has no deadline of its own
def test_a_bare_celery_worker_checks_the_key_too(settings):
    """`celery -A worker.celery worker` (by hand, or another supervisor) stops on a key that does not
    decrypt the stored secrets, and reminds about one under a fallback key, as `synthguard worker` does."""
    right = _worker_env(settings, f"bare-{uuid.uuid4().hex[:8]}")
    assert run("webhooks", "client-secret", "acme", env=right).exit_code == 0
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery",
        "worker",
        "--pool=solo",
        "--loglevel=INFO",
    ]
    wrong_key = secrets.token_hex(32)

    refused = subprocess.run(
        command,
        env={**right, "SYNTHGUARD_SECRET_KEY": wrong_key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0
    assert "synthguard: SYNTHGUARD_SECRET_KEY does not decrypt the stored webhook secrets" in refused.stderr
    assert wrong_key not in refused.stderr + refused.stdout

    fallback = {
        **right,
        "SYNTHGUARD_SECRET_KEY": wrong_key,
        "SYNTHGUARD_SECRET_KEY_FALLBACKS": right["SYNTHGUARD_SECRET_KEY"],
    }
    worker = subprocess.Popen(
        command, env=fallback, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert worker.stdout is not None
        lines: list[str] = []
        for line in worker.stdout:
            lines.append(line)
            if "ready." in line or "webhooks rekey" in line:
                break
        assert any(
            "webhook secrets are stored under a key in SYNTHGUARD_SECRET_KEY_FALLBACKS" in x for x in lines
        ), lines
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.communicate(timeout=60)  # reads the rest and closes the pipe
        except subprocess.TimeoutExpired:
            worker.kill()  # never leave a worker behind
            worker.communicate()


def test_a_busy_sqlite_database_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """Another process holding SQLite's write lock past the busy wait (30 s; 0.2 s here)."""
    import sqlite3

    import db.session

    database = str(tmp_path / "busy.db")
    assert run("db", "upgrade", "--db", database).exit_code == 0
    monkeypatch.setattr(db.session, "SQLITE_BUSY_TIMEOUT_MS", 200)
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        busy = run("clients", "set", "acme", "--flag-uncertain", "--db", database)
    finally:
        holder.close()
    assert busy.exit_code == 1
    assert busy.stderr.strip().splitlines() == [
        "Error: database error: database is locked (another process kept the SQLite database busy; try again)"
    ]
    assert run("clients", "set", "acme", "--flag-uncertain", "--db", database).exit_code == 0


def test_review_overrides_the_model_verdict(tmp_path, images):
    db_path = str(tmp_path / "review.db")
    scanned = json.loads(run("scan", str(images / "one.png"), "--db", db_path, "--format", "json").stdout)
    check_id = scanned[0]["check_id"]
    model_verdict = scanned[0]["verdict"]

    note = "seen it on a prompt site"
    result = run("review", check_id, "--verdict", "generated", "--reviewer", "alice", "--note", note,
                 "--db", db_path, "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    reviewed = json.loads(result.stdout)[0]
    assert reviewed["previous_verdict"] == model_verdict and reviewed["verdict"] == "generated"

    flagged = json.loads(run("verdicts", "--flagged", "--db", db_path, "--format", "json").stdout)
    assert [row["check_id"] for row in flagged] == [check_id]
    assert flagged[0]["model_verdict"] == model_verdict
    shown = run("show", check_id, "--db", db_path).stdout
    assert "alice" in shown and "a reviewer set generated" in shown

    run("review", check_id, "--verdict", "real", "--reviewer", "bob", "--db", db_path)
    assert json.loads(run("verdicts", "--flagged", "--db", db_path, "--format", "json").stdout) == []
    details = json.loads(run("show", check_id, "--db", db_path, "--format", "json").stdout)
    assert [(r["reviewer"], r["new_verdict"]) for r in details["reviews"]] == [
        ("alice", "generated"),
        ("bob", "real"),
    ]

    missing = run("review", str(uuid.uuid4()), "--verdict", "real", "--reviewer", "x", "--db", db_path)
    assert missing.exit_code == 1 and "no check" in missing.stderr


def test_scan_sends_webhooks_without_a_broker(tmp_path, images, httpserver):
    db_path = str(tmp_path / "hooks.db")
    env = {
        "SYNTHGUARD_DATABASE_URL": f"sqlite:///{db_path}",  # webhooks commands read the env
        "SYNTHGUARD_SECRET_KEY": "0123456789abcdef0123456789abcdef",
        "SYNTHGUARD_ALLOW_PRIVATE_HOSTS": "127.0.0.1,localhost",
        # Nothing listens here: a scan must not need a broker to deliver.
        "SYNTHGUARD_BROKER_URL": "redis://127.0.0.1:9/0",
    }
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    assert run("db", "upgrade", env=env).exit_code == 0
    added = run("webhooks", "add", httpserver.url_for("/hook"), "--client", "scan", "--events",
                "check.completed,check.failed", env=env)  # fmt: skip
    assert added.exit_code == 0, added.output

    result = run("scan", str(images), "--format", "json", env=env)
    assert result.exit_code == 0, result.output
    bodies = [json.loads(request.get_data()) for request, _ in httpserver.log]
    assert sorted(body["type"] for body in bodies) == ["check.completed", "check.completed"]
    scanned_ids = {row["check_id"] for row in json.loads(result.stdout)}
    assert {body["data"]["check_id"] for body in bodies} == scanned_ids
