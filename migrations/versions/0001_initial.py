"""Initial schema: clients, verdicts, evidence, checks, reviews and the flagged_checks view.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-26 15:10:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TZ = sa.DateTime(timezone=True)

# Flagged = the reviewer said "generated"; or, unreviewed, the model said "generated", or the client flags
# "uncertain" verdicts, or the score reaches the client's own threshold. db.queries.flagged_condition() is the
# same rule in SQLAlchemy terms; a test keeps the two in agreement. Plain SQL valid on PostgreSQL and SQLite.
FLAGGED_CHECKS_VIEW = """
CREATE VIEW flagged_checks AS
SELECT
    c.id AS check_id,
    c.client AS client,
    c.external_id AS external_id,
    c.source_url AS source_url,
    c.sha256 AS sha256,
    c.created_at AS created_at,
    c.finished_at AS finished_at,
    COALESCE(c.reviewed_verdict, v.verdict) AS verdict,
    v.verdict AS model_verdict,
    c.reviewed_verdict AS reviewed_verdict,
    v.score AS score,
    v.threshold AS threshold,
    v.model_id AS model_id,
    v.decided_by AS decided_by,
    v.id AS verdict_id,
    e.group_name AS evidence_group,
    e.data AS evidence
FROM checks AS c
JOIN verdicts AS v ON v.id = c.verdict_id
LEFT JOIN clients AS cl ON cl.name = c.client
LEFT JOIN evidence AS e ON e.verdict_id = v.id
WHERE c.status = 'done'
  AND (
    c.reviewed_verdict = 'generated'
    OR (
      c.reviewed_verdict IS NULL
      AND (
        v.verdict = 'generated'
        OR (v.verdict = 'uncertain' AND cl.flag_uncertain)
        OR (cl.flag_threshold IS NOT NULL AND v.score >= cl.flag_threshold)
      )
    )
  )
ORDER BY c.created_at DESC, c.id, e.group_name
"""


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("flag_threshold", sa.Float(), nullable=True),
        sa.Column("flag_uncertain", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_clients")),
    )
    op.create_table(
        "verdicts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(100), nullable=False),
        sa.Column("model_version", sa.String(100), nullable=False),
        sa.Column("weights_sha", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(255), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("family_scores", JSON_DOCUMENT, nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("decided_by", sa.String(16), nullable=False),
        sa.Column("reasons", JSON_DOCUMENT, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint("verdict IN ('generated', 'real', 'uncertain')", name=op.f("ck_verdicts_verdict")),
        sa.CheckConstraint(
            "decided_by IN ('pixels', 'provenance', 'unanalysable')", name=op.f("ck_verdicts_decided_by")
        ),
        sa.CheckConstraint("score >= 0 AND score <= 1", name=op.f("ck_verdicts_score_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdicts")),
        sa.UniqueConstraint("sha256", "model_id", name=op.f("uq_verdicts_sha256_model_id")),
    )
    op.create_index("ix_verdicts_verdict_created_at", "verdicts", ["verdict", "created_at"])
    op.create_table(
        "evidence",
        sa.Column("verdict_id", sa.Uuid(), nullable=False),
        sa.Column("group_name", sa.String(32), nullable=False),
        sa.Column("data", JSON_DOCUMENT, nullable=False),
        sa.ForeignKeyConstraint(
            ["verdict_id"],
            ["verdicts.id"],
            name=op.f("fk_evidence_verdict_id_verdicts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("verdict_id", "group_name", name=op.f("pk_evidence")),
    )
    op.create_table(
        "checks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("client", sa.String(100), nullable=False),
        sa.Column("external_id", sa.String(255), nullable=False),
        sa.Column("source_url", sa.Text(), nullable=True),
        sa.Column("has_inline_image", sa.Boolean(), nullable=False),
        sa.Column("image_data", sa.LargeBinary(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("phash", sa.String(64), nullable=True),
        sa.Column("phash_quality", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("metadata", JSON_DOCUMENT, nullable=True),
        sa.Column("verdict_id", sa.Uuid(), nullable=True),
        sa.Column("reviewed_verdict", sa.String(16), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'processing', 'done', 'failed')", name=op.f("ck_checks_status")
        ),
        sa.CheckConstraint(
            "reviewed_verdict IN ('generated', 'real', 'uncertain')", name=op.f("ck_checks_reviewed_verdict")
        ),
        sa.ForeignKeyConstraint(
            ["verdict_id"],
            ["verdicts.id"],
            name=op.f("fk_checks_verdict_id_verdicts"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checks")),
        sa.UniqueConstraint("client", "external_id", name=op.f("uq_checks_client_external_id")),
    )
    op.create_index("ix_checks_status_updated_at", "checks", ["status", "updated_at"])
    op.create_index("ix_checks_client_created_at", "checks", ["client", "created_at"])
    op.create_index("ix_checks_created_at", "checks", ["created_at"])
    op.create_index("ix_checks_sha256", "checks", ["sha256"])
    op.create_index("ix_checks_phash", "checks", ["phash"])
    op.create_index("ix_checks_verdict_id", "checks", ["verdict_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("check_id", sa.Uuid(), nullable=False),
        sa.Column("reviewer", sa.String(100), nullable=False),
        sa.Column("previous_verdict", sa.String(16), nullable=True),
        sa.Column("new_verdict", sa.String(16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint(
            "new_verdict IN ('generated', 'real', 'uncertain')", name=op.f("ck_reviews_new_verdict")
        ),
        sa.ForeignKeyConstraint(
            ["check_id"], ["checks.id"], name=op.f("fk_reviews_check_id_checks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
    )
    op.create_index("ix_reviews_check_id_created_at", "reviews", ["check_id", "created_at"])
    op.execute(FLAGGED_CHECKS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS flagged_checks")
    op.drop_index("ix_reviews_check_id_created_at", table_name="reviews")
    op.drop_table("reviews")
    for index in (
        "ix_checks_verdict_id",
        "ix_checks_phash",
        "ix_checks_sha256",
        "ix_checks_created_at",
        "ix_checks_client_created_at",
        "ix_checks_status_updated_at",
    ):
        op.drop_index(index, table_name="checks")
    op.drop_table("checks")
    op.drop_table("evidence")
    op.drop_index("ix_verdicts_verdict_created_at", table_name="verdicts")
    op.drop_table("verdicts")
    op.drop_table("clients")
