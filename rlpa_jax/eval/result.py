"""An evaluation's result: per-user, per-turn judgments, the AL report (eval/metrics.py), the
profile scores of a setting that checks them, and the transcripts; the JSON launch/eval.py writes
and --compare reads back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlpa_jax.eval.metrics import ALReport


@dataclass
class EvalResult:
    name: str
    setting: str
    judgments: np.ndarray  # (users, turns): 1.0 / 0.0, NaN where unscored
    al: ALReport
    profile_scores: list[dict] | None = None  # a setting with profile checks: one entry per check
    transcripts: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "setting": self.setting,
            "judgments": [[None if np.isnan(value) else int(value) for value in row] for row in self.judgments],
            "al": self.al.to_json(),
            "profile_scores": self.profile_scores,
            "transcripts": self.transcripts,
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "result") -> "EvalResult":
        missing = [key for key in ("name", "setting", "judgments", "al") if key not in data]
        if missing:
            raise ValueError(f"{source}: not an evaluation result (missing {', '.join(missing)}); "
                             "expected the JSON written by launch/eval.py")
        judgments = np.array([[np.nan if value is None else float(value) for value in row]
                              for row in data["judgments"]], dtype=np.float64).reshape(len(data["judgments"]), -1)
        return cls(data["name"], data["setting"], judgments, ALReport.from_json(data["al"], source),
                   data.get("profile_scores"), data.get("transcripts", []))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: result file not found") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        return cls.from_json(data, str(path))
