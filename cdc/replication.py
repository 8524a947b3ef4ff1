"""The walsender connection: a thin asyncio layer over psycopg's libpq wrapper.

It moves CopyBoth payloads in and out and knows nothing of their content;
cdc/pgoutput.py parses them. Since psycopg 3.3, START_REPLICATION can be issued
on a ``replication=database`` connection; the stream is then read with
``pgconn.get_copy_data`` and answered with ``pgconn.put_copy_data``
(Postgres docs, "Streaming Replication Protocol").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import psycopg
from psycopg import pq

from cdc.lsn import format_lsn, parse_lsn

__all__ = ["ReplicationConnection", "ReplicationError", "SlotInfo"]


class ReplicationError(Exception):
    """The walsender connection failed or refused a command."""


@dataclass(frozen=True, slots=True)
class SlotInfo:
    name: str
    consistent_point: int
    snapshot_name: str | None


class ReplicationConnection:
    def __init__(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        self._readable = asyncio.Event()
        self._streaming = False

    @classmethod
    async def connect(cls, dsn: str, timeout: float = 10.0) -> ReplicationConnection:
        # the caller passes a DSN already carrying replication=database
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=int(timeout))
        return cls(conn)

    async def identify_system(self) -> tuple[str, int, int]:
        """(system id, timeline, current WAL flush position)."""
        cur = await self._conn.execute("IDENTIFY_SYSTEM")
        row = await cur.fetchone()
        assert row is not None
        return str(row[0]), int(str(row[1])), parse_lsn(str(row[2]))

    async def create_slot(self, name: str, export_snapshot: bool) -> SlotInfo:
        """Create a pgoutput slot; with ``export_snapshot`` the snapshot lives until
        this connection runs its next command, so read it before starting to stream."""
        mode = "EXPORT_SNAPSHOT" if export_snapshot else "NOEXPORT_SNAPSHOT"
        try:
            cur = await self._conn.execute(f'CREATE_REPLICATION_SLOT "{name}" LOGICAL pgoutput {mode}')
        except psycopg.Error as exc:
            raise ReplicationError(f'cannot create replication slot "{name}": {exc}') from None
        row = await cur.fetchone()
        assert row is not None
        return SlotInfo(str(row[0]), parse_lsn(str(row[1])), str(row[2]) if row[2] else None)

    async def start(
        self,
        slot: str,
        start_lsn: int,
        publication: str,
        proto_version: int = 2,
        streaming: bool = True,
        messages: bool = True,
    ) -> None:
        options = [f"proto_version '{proto_version}'", f"publication_names '{publication}'"]
        if streaming and proto_version >= 2:
            options.append("streaming 'on'")
        if messages:
            options.append("messages 'true'")
        command = f'START_REPLICATION SLOT "{slot}" LOGICAL {format_lsn(start_lsn)} ({", ".join(options)})'
        try:
            await self._conn.execute(command)
        except psycopg.Error as exc:
            raise ReplicationError(f'cannot start replication from slot "{slot}": {exc}') from None
        self._streaming = True
        loop = asyncio.get_running_loop()
        loop.add_reader(self._pgconn.socket, self._readable.set)

    async def read(self, max_messages: int = 4096, timeout: float = 1.0) -> list[memoryview]:
        """Wait up to ``timeout`` for copy data, then return all that is buffered (at most
        ``max_messages``). An empty list means the timeout passed quietly."""
        pgconn = self._pgconn
        out: list[memoryview] = []
        waited = False
        while len(out) < max_messages:
            try:
                nbytes, data = pgconn.get_copy_data(1)
            except psycopg.Error as exc:
                raise ReplicationError(f"replication stream failed: {exc}") from None
            if nbytes > 0:
                out.append(data)
                continue
            if nbytes == 0:
                if out or waited:
                    break
                self._readable.clear()
                try:
                    await asyncio.wait_for(self._readable.wait(), timeout)
                except TimeoutError:
                    pass
                waited = True
                try:
                    pgconn.consume_input()
                except psycopg.Error as exc:
                    raise ReplicationError(f"replication connection lost: {exc}") from None
                continue
            self._raise_stream_end()
        return out

    def _raise_stream_end(self) -> None:
        self._streaming = False
        message = ""
        while (res := self._pgconn.get_result()) is not None:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                message = (res.error_message or b"").decode("utf-8", "replace").strip()
        if not message:
            message = (self._pgconn.error_message or b"").decode("utf-8", "replace").strip()
        raise ReplicationError(f"replication stream ended: {message or 'server closed the stream'}")

    async def send(self, payload: bytes) -> None:
        """Send one CopyData message (a standby status update)."""
        pgconn = self._pgconn
        try:
            if pgconn.put_copy_data(payload) != 1:
                raise ReplicationError("cannot queue a status update on the replication connection")
            while pgconn.flush() == 1:
                await asyncio.sleep(0.001)
        except psycopg.Error as exc:
            raise ReplicationError(f"replication connection lost while sending: {exc}") from None

    async def close(self) -> None:
        if self._streaming:
            try:
                asyncio.get_running_loop().remove_reader(self._pgconn.socket)
            except Exception:
                pass
            self._streaming = False
        await self._conn.close()
