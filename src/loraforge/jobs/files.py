"""Uploaded files (``purpose=fine-tune``): stored privately, hashed, and checked like ``loraforge data check``.

An upload is streamed to a temporary file under ``HOME/files/<id>/`` with a size limit and renamed
into place only when complete; its sha256 is computed on the way. The licence is declared with the
upload (``license``, ``owner``, ``personal_data``) or by the tenant's default declaration, and
becomes the file's licence manifest beside it, so the same policy decides as for ``data check``.
The check's result is the file's ``status`` (``processed`` or ``error``) and ``status_details``
(the problems, with their line numbers).

Every lookup is scoped to a tenant: another tenant's file is reported as missing, never as forbidden.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from loraforge.errors import LoraforgeError, NotFoundError, RequestError
from loraforge.files import private_directory, write_text_atomic
from loraforge.registry.database import Registry
from loraforge.registry.schema import File, Job, ensure_tenant

PURPOSES = ("fine-tune",)
SUFFIXES = (".jsonl", ".json", ".csv")
FINAL = ("succeeded", "failed", "cancelled")
SHOWN_PROBLEMS = 10


@dataclass(frozen=True)
class Declaration:
    """Who owns an uploaded dataset and under which licence; becomes its licence manifest."""

    license: str
    owner: str
    personal_data: bool

    @classmethod
    def from_form(cls, license: str | None, owner: str | None, personal_data: str | None) -> Declaration | None:
        """The declaration sent as extra form fields, or None when none was sent.

        Raises:
            RequestError: a partial declaration, or ``personal_data`` that is not true/false.
        """
        if license is None and owner is None and personal_data is None:
            return None
        missing = [n for n, v in (("license", license), ("owner", owner), ("personal_data", personal_data)) if not v]
        if missing:
            raise RequestError(
                f"a licence declaration needs license, owner and personal_data; {', '.join(missing)} missing",
                param=missing[0],
            )
        flag = str(personal_data).strip().lower()
        if flag not in ("true", "false", "yes", "no", "1", "0"):
            raise RequestError(f"personal_data must be true or false, got {personal_data!r}", param="personal_data")
        return cls(str(license).strip(), str(owner).strip(), flag in ("true", "yes", "1"))


def file_object(row: File) -> dict[str, Any]:
    """OpenAI's ``file`` object."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": row.status_details,
        "expires_at": None,
    }


class FileService:
    """Upload, list, read and delete a tenant's files; uploads are checked before they can be trained on."""

    def __init__(
        self,
        registry: Registry,
        root: Path,
        *,
        max_bytes: int,
        policy: Path | None = None,
        tokenizer: Any = None,
        default_declarations: dict[str, Declaration] | None = None,
    ) -> None:
        self.registry = registry
        self.root = root
        self.max_bytes = max_bytes
        self.policy = policy
        self.tokenizer = tokenizer
        self.default_declarations = default_declarations or {}

    # --- create ----------------------------------------------------------------------------------
    def create(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        chunks: Iterable[bytes],
        declaration: Declaration | None = None,
    ) -> dict[str, Any]:
        """Store ``chunks`` as a new file of ``tenant``, check it, and return its ``file`` object.

        Raises:
            RequestError: a purpose other than fine-tune, a name that is no dataset file, or too many bytes.
        """
        if purpose not in PURPOSES:
            raise RequestError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}", param="purpose")
        name = Path(filename or "").name
        if Path(name).suffix.lower() not in SUFFIXES:
            raise RequestError(
                f"file name {filename!r} must end in {', '.join(SUFFIXES)} (the dataset's format)", param="file"
            )
        ident = f"file-{secrets.token_hex(12)}"
        directory = private_directory(self.root / ident)
        # a fixed name on disk (the user's name stays in the registry): nothing from the client reaches a path
        path = directory / f"data{Path(name).suffix.lower()}"
        try:
            size, digest = self._receive(chunks, path)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        now = time.time()
        with self.registry.session() as s:
            ensure_tenant(s, tenant, now)
            row = File(
                id=ident,
                tenant=tenant,
                filename=name,
                purpose=purpose,
                bytes=size,
                sha256=digest,
                path=str(path),
                status="uploaded",
                created_at=now,
            )
            s.add(row)
        declared = declaration or self.default_declarations.get(tenant)
        status, details, licence, check = self._check(path, name, declared)
        with self.registry.session() as s:
            stored = s.get(File, ident)
            assert stored is not None
            stored.status, stored.status_details, stored.licence, stored.check = status, details, licence, check
            return file_object(stored)

    def _receive(self, chunks: Iterable[bytes], path: Path) -> tuple[int, str]:
        """Write ``chunks`` to ``path`` through a temporary file; (bytes, sha256)."""
        tmp = path.with_name(f".{path.name}.part")
        h, size = hashlib.sha256(), 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise RequestError(
                        f"the file is larger than this server's upload limit of {self.max_bytes} bytes",
                        param="file",
                        code="file_too_large",
                    )
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if size == 0:
            tmp.unlink()
            raise RequestError("the file is empty", param="file")
        os.replace(tmp, path)
        return size, h.hexdigest()

    def _check(
        self, path: Path, name: str, declared: Declaration | None
    ) -> tuple[str, str | None, dict[str, Any] | None, dict[str, Any]]:
        """(status, status_details, licence manifest, check summary) of a stored upload."""
        from loraforge.data.licensing import manifest_path_for
        from loraforge.data.prepare import check_data

        licence = None
        if declared is not None:
            licence = {
                "sources": [
                    {
                        "path": path.name,
                        "license": declared.license,
                        "owner": declared.owner,
                        "personal_data": declared.personal_data,
                    }
                ]
            }
            write_text_atomic(manifest_path_for(path), yaml.safe_dump(licence, sort_keys=False))
        try:
            checked = check_data(path, self.tokenizer, policy=self.policy)
            report, licensing, governance = checked.report, checked.licensing, checked.governance
        except LoraforgeError as e:
            return "error", str(e).replace(str(path), name), licence, {"error": str(e).replace(str(path), name)}
        errors = [p for p in report.errors if declared is not None or p.field != "licence"]
        problems = [str(p).replace(str(path), name) for p in errors]
        if declared is None:  # say how to declare it, rather than that no manifest file was found
            problems.insert(
                0,
                f"{name}: no licence declared: send the form fields license (an SPDX id or LicenseRef-…), owner and "
                'personal_data (true/false) with the upload (the openai SDK: extra_body={"license": …, "owner": …, '
                '"personal_data": "false"})',
            )
        check = {
            "summary": report.summary(),
            "licensing": licensing.to_json() if licensing else None,
            "governance": governance,
            "problems": problems,
            "warnings": [str(p).replace(str(path), name) for p in report.problems if p.severity == "warning"],
        }
        if problems:
            more = len(problems) - SHOWN_PROBLEMS
            shown = problems[:SHOWN_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
            return "error", "\n".join(shown), licence, check
        return "processed", None, licence, check

    # --- read ------------------------------------------------------------------------------------
    def get(self, tenant: str, ident: str) -> File:
        """The file ``ident`` of ``tenant``. Raises NotFoundError for a missing, deleted or foreign one."""
        with self.registry.session() as s:
            row = s.get(File, ident)
            if row is None or row.tenant != tenant or row.deleted_at is not None:
                raise NotFoundError("file", ident)
            return row

    def retrieve(self, tenant: str, ident: str) -> dict[str, Any]:
        return file_object(self.get(tenant, ident))

    def content_path(self, tenant: str, ident: str) -> Path:
        return Path(self.get(tenant, ident).path)

    def list(
        self,
        tenant: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10000,
        order: str = "desc",
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of the tenant's files, newest first by default; (files, has_more)."""
        if not 1 <= limit <= 10000:
            raise RequestError(f"limit must be from 1 to 10000, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise RequestError(f"order must be asc or desc, got {order!r}", param="order")
        with self.registry.session() as s:
            q = select(File).where(File.tenant == tenant, File.deleted_at.is_(None))
            if purpose:
                q = q.where(File.purpose == purpose)
            key = (File.created_at, File.id)
            if after:
                anchor = s.get(File, after)
                if anchor is None or anchor.tenant != tenant:
                    raise NotFoundError("file", after)
                if order == "desc":
                    q = q.where(
                        (File.created_at < anchor.created_at)
                        | ((File.created_at == anchor.created_at) & (File.id < anchor.id))
                    )
                else:
                    q = q.where(
                        (File.created_at > anchor.created_at)
                        | ((File.created_at == anchor.created_at) & (File.id > anchor.id))
                    )
            q = q.order_by(*(k.desc() for k in key) if order == "desc" else key).limit(limit + 1)
            rows = list(s.scalars(q))
        return [file_object(r) for r in rows[:limit]], len(rows) > limit

    # --- delete ----------------------------------------------------------------------------------
    def delete(self, tenant: str, ident: str) -> dict[str, Any]:
        """Delete a file's bytes; its registry row stays for lineage. Refused while a job still needs it."""
        with self.registry.session() as s:
            row = s.get(File, ident)
            if row is None or row.tenant != tenant or row.deleted_at is not None:
                raise NotFoundError("file", ident)
            busy = s.scalars(
                select(Job.id).where(
                    (Job.training_file == ident) | (Job.validation_file == ident), Job.status.not_in(FINAL)
                )
            ).first()
            if busy:
                raise RequestError(
                    f"file {ident} is used by the fine-tuning job {busy}, which has not finished; "
                    "cancel the job or wait for it",
                    param="file_id",
                )
            row.deleted_at = time.time()
            directory = Path(row.path).parent
        shutil.rmtree(directory, ignore_errors=True)
        return {"id": ident, "object": "file", "deleted": True}
