"""The feedback store: served responses, feedback, exports and retrain runs in one database.

SQLite (WAL, synchronous=FULL) by default, PostgreSQL by URL; the schema is migrated to the
newest revision on open. HTTP, export formats and statistics live in routes/export/stats.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tuneforge.errors import FeedbackError, StoreUnavailable
from tuneforge.feedback.models import ExportedDataset, Feedback, Response, RetrainRun
from tuneforge.feedback.validate import FeedbackItem, FieldError
from tuneforge.serve.records import JsonlRecordSink, ResponseRecord

log = logging.getLogger("tuneforge")
MIGRATIONS = Path(__file__).parent / "migrations"
HEAD = "0002"
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")  # lone surrogates and NUL: no database takes them


def database_url(url: str | Path) -> str:
    """`url` as an SQLAlchemy URL; a plain file path means an SQLite file."""
    text = str(url)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    return text


def _clean(text: str | None) -> str | None:
    """Text a database accepts: lone surrogates and NUL replaced (served text is never refused)."""
    if text is None:
        return None
    return _UNSTORABLE.sub("\ufffd", text)


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # transactions are begun below, IMMEDIATE
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # take the write lock up front: no deadlocked lock upgrades
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, busy_timeout_s: float = 5.0) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise FeedbackError(f"--db: {url!r} is not a database URL or file path") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s})
        _sqlite_pragmas(engine)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise FeedbackError(f"--db: {parsed.get_backend_name()!r}: use sqlite or postgresql")
    connect = {"connect_timeout": max(1, math.ceil(busy_timeout_s))}
    return create_engine(url, pool_pre_ping=True, connect_args=connect)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the packaged migrations up to `revision` (adds tables and columns, never drops)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # before import: it logs plugins
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _must_exist(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).is_file():
            raise StoreUnavailable(f"--db {parsed.database}: no such database file")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, sort_keys=True, default=str)


class FeedbackStore:
    """The database behind `/v1/feedback`, the dashboard, export and retrain.

    Also a serve `RecordSink`: `write(record)` stores a served response (idempotent on its id);
    when the database is down the record goes to `spool` and is replayed on the next write.
    """

    def __init__(
        self,
        url: str | Path,
        *,
        busy_timeout_s: float = 5.0,
        spool: str | Path | None = None,
        create: bool = True,
    ) -> None:
        """`create=False`: refuse an SQLite file that does not exist yet (readers, not writers)."""
        self.url = database_url(url)
        if not create:
            _must_exist(self.url)
        self.engine = make_engine(self.url, busy_timeout_s)
        self.spool = JsonlRecordSink(spool) if spool else None
        try:
            upgrade(self.engine)
        except SQLAlchemyError as err:
            self.engine.dispose()
            raise StoreUnavailable(
                f"--db {self.safe_url}: cannot open the store: {_why(err)}"
            ) from err
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction, committed before returning; database failures become StoreUnavailable."""
        try:
            with self._session.begin() as session:
                yield session
        except (IntegrityError, FieldError):
            raise
        except SQLAlchemyError as err:
            raise StoreUnavailable(f"feedback store {self.safe_url}: {_why(err)}") from err

    # --- responses (the RecordSink side) -----------------------------------------------------

    def write(self, record: ResponseRecord) -> None:
        try:
            self._drain_spool()
            self._insert_response(record)
        except StoreUnavailable as err:
            if self.spool is None:
                raise
            log.warning("%s; record %s kept in %s", err, record.id, self.spool.path)
            self.spool.write(record)

    def _insert_response(self, record: ResponseRecord) -> bool:
        row = Response(
            id=record.id,
            created=record.created,
            route=record.route,
            model=_clean(record.model),
            adapter=_clean(record.adapter),
            request=_dumps(record.request),
            prompt=_clean(record.prompt),
            completion=_clean(record.completion),
            finish_reason=record.finish_reason,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            latency_s=record.latency_s,
            ttft_s=record.ttft_s,
            status=record.status,
            error=_clean(record.error),
        )
        try:
            with self.session() as s:
                if s.get(Response, record.id) is not None:
                    return False
                s.add(row)
            return True
        except IntegrityError:  # written by a concurrent writer in between: the same record
            return False

    def _drain_spool(self) -> None:
        if self.spool is None or not self.spool.path.is_file():
            return
        for record in self.spool.read():
            self._insert_response(record)
        self.spool.path.unlink()

    def get_response(self, response_id: str) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.get(Response, response_id)
            return _response_dict(row) if row is not None else None

    def responses(self, since: float = 0.0, limit: int = 100_000) -> list[dict[str, Any]]:
        """The newest `limit` responses created at or after `since`, oldest first."""
        query = (
            select(Response)
            .where(Response.created >= since)
            .order_by(Response.created.desc())
            .limit(limit)
        )
        with self.session() as s:
            return [_response_dict(r) for r in reversed(s.scalars(query).all())]

    # --- feedback ----------------------------------------------------------------------------

    def add_feedback(self, item: FeedbackItem, source: str = "api") -> tuple[dict[str, Any], bool]:
        """Store `item` and commit; returns (the row, created). A key seen before returns its row.

        Raises FieldError 404 for an unknown response id, 409 when a key is reused for other
        content, StoreUnavailable when the database is down or locked.
        """
        digest = item.payload_sha256()
        for _ in range(2):  # a concurrent insert of the same key loses the race once, then reads
            try:
                with self.session() as s:
                    found = self._by_key(s, item.idempotency_key, digest)
                    if found is not None:
                        return _feedback_dict(found), False
                    if s.get(Response, item.response_id) is None:
                        raise FieldError(
                            404, "response_id", f"response_id: no response {item.response_id!r}"
                        )
                    row = _feedback_row(item, digest, source)
                    s.add(row)
                    s.flush()
                    return _feedback_dict(row), True
            except IntegrityError:
                continue
        raise StoreUnavailable("feedback store: the idempotency key could not be settled")

    @staticmethod
    def _by_key(s: Session, key: str | None, digest: str) -> Feedback | None:
        if key is None:
            return None
        row = s.scalars(select(Feedback).where(Feedback.idempotency_key == key)).first()
        if row is not None and row.payload_sha256 and row.payload_sha256 != digest:
            raise FieldError(
                409, "idempotency_key", "idempotency_key: already used for different feedback"
            )
        return row

    def feedback(self, since: float = 0.0, after_id: int = 0) -> list[dict[str, Any]]:
        """Feedback rows (with their response) created at or after `since`, by id."""
        query = (
            select(Feedback, Response)
            .join(Response, Feedback.response_id == Response.id)
            .where(Feedback.created >= since, Feedback.id > after_id)
            .order_by(Feedback.id)
        )
        with self.session() as s:
            return [
                {**_feedback_dict(f), "response": _response_dict(r)} for f, r in s.execute(query)
            ]

    # --- lineage: exports and retrain runs ---------------------------------------------------

    def record_export(
        self, kind: str, path: str, sha256: str, feedback_ids: list[int], filters: dict[str, Any]
    ) -> int:
        row = ExportedDataset(
            created=time.time(),
            kind=kind,
            path=str(path),
            sha256=sha256,
            rows=len(feedback_ids),
            feedback_ids=_dumps(feedback_ids),
            filters=_dumps(filters),
        )
        with self.session() as s:
            s.add(row)
            s.flush()
            return row.id

    def start_retrain(self, **fields: Any) -> int:
        row = RetrainRun(
            started=time.time(), decision="running", reason="", metrics="{}", **_encode(fields)
        )
        with self.session() as s:
            s.add(row)
            s.flush()
            return row.id

    def finish_retrain(self, run_id: int, **fields: Any) -> None:
        with self.session() as s:
            row = s.get(RetrainRun, run_id)
            for key, value in _encode(fields).items():
                setattr(row, key, value)
            row.finished = time.time()

    def retrain_runs(self) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(RetrainRun).order_by(RetrainRun.id)).all()
            return [_decode(r, ("data_hashes", "feedback_ids", "metrics")) for r in rows]

    def exports(self) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(ExportedDataset).order_by(ExportedDataset.id)).all()
            return [_decode(r, ("feedback_ids", "filters")) for r in rows]

    def tables(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())


_JSON_FIELDS = ("data_hashes", "feedback_ids", "metrics")


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: _dumps(v) if k in _JSON_FIELDS else v for k, v in fields.items()}


def _decode(row: Any, json_fields: tuple[str, ...]) -> dict[str, Any]:
    out = {c.key: getattr(row, c.key) for c in inspect(row).mapper.column_attrs}
    return {k: json.loads(v) if k in json_fields else v for k, v in out.items()}


def _feedback_row(item: FeedbackItem, digest: str, source: str) -> Feedback:
    return Feedback(
        response_id=item.response_id,
        created=time.time(),
        rating=item.rating,
        scale=item.scale,
        score=item.score,
        correction=item.correction,
        tags=_dumps(item.tags),
        comment=item.comment,
        idempotency_key=item.idempotency_key,
        source=source,
        payload_sha256=digest,
    )


def _feedback_dict(row: Feedback) -> dict[str, Any]:
    return _decode(row, ("tags",))


def _response_dict(row: Response) -> dict[str, Any]:
    return _decode(row, ("request",))


def _why(err: SQLAlchemyError) -> str:
    """The driver's one-line reason, without SQLAlchemy's SQL echo and link."""
    orig = getattr(err, "orig", None) or err
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
