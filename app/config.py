"""Settings every odpo process shares: where the data lives and which database to use.

Each process adds its own config dataclass (serve, train, judge) on top of this one; this is the
only place the data-directory layout is spelled out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from odpo.db.engine import Database
from odpo.db.settings import resolve_data_dir, resolve_db_url


@dataclass(frozen=True)
class CommonConfig:
    data_dir: Path
    db_url: str

    @classmethod
    def resolve(cls, *, data_dir: Optional[str] = None, db_url: Optional[str] = None) -> "CommonConfig":
        root = resolve_data_dir(data_dir)
        return cls(data_dir=root, db_url=resolve_db_url(db_url, data_dir=root))

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    def run_dir(self, run: str = "default") -> Path:
        return self.data_dir / "runs" / run

    def adapters_dir(self, run: str = "default") -> Path:
        return self.run_dir(run) / "adapters"

    def open_db(self) -> Database:
        """Open (and migrate) the database; raises db.engine.DatabaseError with a readable line."""
        return Database(self.db_url)
