"""The feedback store's tables as SQLAlchemy 2 mapped classes (the schema at the newest revision).

The migrations under `migrations/versions` create these tables; a test checks that both agree.
"""

from __future__ import annotations

from sqlalchemy import Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Response(Base):
    """One served (or refused) request, as the server's ResponseRecord described it."""

    __tablename__ = "responses"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    route: Mapped[str] = mapped_column(String(80))
    model: Mapped[str] = mapped_column(String(300))
    adapter: Mapped[str | None] = mapped_column(String(300))
    request: Mapped[str] = mapped_column(Text)  # the request body as JSON text
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(40))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_s: Mapped[float] = mapped_column(Float)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class Feedback(Base):
    """A rating of one response, with an optional correction, tags and comment."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(String(80), ForeignKey("responses.id"), index=True)
    created: Mapped[float] = mapped_column(Float, index=True)
    rating: Mapped[int] = mapped_column(Integer)
    scale: Mapped[str] = mapped_column(String(10))  # "thumbs" (-1/+1) or "stars" (1-5)
    score: Mapped[float] = mapped_column(Float)  # the rating on 0..1
    correction: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[str] = mapped_column(Text)  # a JSON list of strings
    comment: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(16), server_default="api")  # api | file
    payload_sha256: Mapped[str] = mapped_column(String(64), server_default="")


class ExportedDataset(Base):
    """A file `feedback export` (or retrain) wrote: what it holds and which feedback went in."""

    __tablename__ = "exported_datasets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(16))  # sft | pairs | kto
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    feedback_ids: Mapped[str] = mapped_column(Text)  # JSON list
    filters: Mapped[str] = mapped_column(Text)  # JSON object: since, min_rating, pii, ...


class RetrainRun(Base):
    """One retrain attempt: its parent, its data, the evaluation and the promotion decision."""

    __tablename__ = "retrain_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float)
    parent_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("retrain_runs.id"))
    parent_path: Mapped[str] = mapped_column(Text)
    candidate_path: Mapped[str | None] = mapped_column(Text)
    objective: Mapped[str] = mapped_column(String(8))
    dataset_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("exported_datasets.id"))
    data_hashes: Mapped[str] = mapped_column(Text)  # JSON object: name -> sha256
    feedback_ids: Mapped[str] = mapped_column(Text)  # JSON list
    metrics: Mapped[str] = mapped_column(Text)  # JSON object
    decision: Mapped[str] = mapped_column(String(16))  # running | promoted | rejected | failed
    reason: Mapped[str] = mapped_column(Text)
