"""Where each output's files live: one object per output kind, asked by every reader and writer.

An annotate output (``fkd annotate SRC OUT``)::

    OUT/images/run_id=<id>/part-<shard>.parquet   a row per file (the shard's commit: written last)
    OUT/faces/run_id=<id>/part-<shard>.parquet    a row per face
    OUT/runs/<id>.json                            the run record
    OUT/runs/<id>.plan.parquet                    which file goes to which shard, fixed before any work
    OUT/runs/<id>.skipped.parquet                 files under the source that are no images, and why
    OUT/locks/                                    the runs' leases

An ingest output (``fkd ingest CSV IMAGES OUT``)::

    OUT/examples/part-<shard>.parquet             training crops and their keypoints
    OUT/ingest_report.json                        counts, refusals, and how the crops were cut
"""

from __future__ import annotations

from dataclasses import dataclass

from fkd_core.storage import join_uri

TABLES = ("images", "faces")


@dataclass(frozen=True)
class AnnotateOutput:
    """The files of an annotate output rooted at ``root`` (a directory or a bucket prefix)."""

    root: str

    def table(self, name: str) -> str:
        """A table's directory (``images`` or ``faces``), partitioned by ``run_id``."""
        if name not in TABLES:
            raise ValueError(f"no table {name!r} in an annotate output: {TABLES}")
        return join_uri(self.root, name)

    def run_dir(self, name: str, run_id: str) -> str:
        """One run's partition of a table."""
        return join_uri(self.table(name), f"run_id={run_id}")

    def part(self, name: str, run_id: str, shard: int) -> str:
        """A shard's part of a table (names are fixed, so a redone shard overwrites its half-state)."""
        return join_uri(self.run_dir(name, run_id), f"part-{shard:05d}.parquet")

    @property
    def runs(self) -> str:
        return join_uri(self.root, "runs")

    def record(self, run_id: str) -> str:
        return join_uri(self.runs, f"{run_id}.json")

    def plan(self, run_id: str) -> str:
        return join_uri(self.runs, f"{run_id}.plan.parquet")

    def skipped(self, run_id: str) -> str:
        return join_uri(self.runs, f"{run_id}.skipped.parquet")

    @property
    def locks(self) -> str:
        return join_uri(self.root, "locks")


@dataclass(frozen=True)
class IngestOutput:
    """The files of an ingest output rooted at ``root``."""

    root: str

    @classmethod
    def of_examples(cls, examples: str) -> IngestOutput:
        """The output whose ``examples`` dataset is at ``examples`` (what train is given)."""
        return cls(examples.rstrip("/").rsplit("/", 1)[0])

    @property
    def examples(self) -> str:
        return join_uri(self.root, "examples")

    def part(self, shard: int) -> str:
        return join_uri(self.examples, f"part-{shard:05d}.parquet")

    @property
    def report(self) -> str:
        return join_uri(self.root, "ingest_report.json")
