"""The identity gate of `squeeze gen`: an image whose DINO score is below `quality.min_dino` is made
again with the next seed of a fixed sequence, up to `quality.max_attempts` images; the best is kept.

Seed sequence (documented in docs/evaluation.md): attempt k (0, 1, 2, ...) of a job with seed s uses
`s + k * SEED_STRIDE`, so attempt 0 is the job's own image and a rerun makes the same attempts.
The score is the `DINO` column of `squeeze eval` against the job's conditioning references.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from squeeze_cli.manifest.schema import QualityGate

if TYPE_CHECKING:
    from PIL import Image

    from squeeze_cli.plan import Job

SEED_STRIDE = 1_000_003  # a prime far from the small seeds manifests use, so attempts rarely meet them


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of attempt `attempt` (0 = the job's own) of a job with seed `seed`."""
    return seed + attempt * SEED_STRIDE


class IdentityGate:
    """Scores generated images with DINO against their references and remakes the weak ones.

    Args:
        quality (`QualityGate`): the thresholds.
        preset_name (`str`): the model preset (`tiny` chooses the tiny metric models under `auto`).
        device (`str`): where the DINO model runs.
    """

    def __init__(self, quality: QualityGate, preset_name: str, device: str = "cpu"):
        from squeeze_cli.metrics.encoders import Encoder

        self.quality = quality
        self.spec = self.dino_spec(quality, preset_name)
        self.encoder = Encoder(self.spec, device)
        self._references: dict[str, Any] = {}

    @staticmethod
    def dino_spec(quality: QualityGate, preset_name: str) -> Any:
        """The DINO model the gate scores with (building the tiny one into the cache when it is chosen)."""
        from squeeze_cli.metrics.protocol import make_protocol

        metrics = quality.metrics
        if metrics == "auto":
            metrics = "tiny" if preset_name == "tiny" else "dreambench"
        return make_protocol(metrics).encoder("dino")

    def score(self, image: Image.Image, references: Sequence[str]) -> float:
        """Mean DINO cosine of `image` with each reference (the `DINO` column of `squeeze eval`)."""
        from squeeze_cli.images import load_rgb

        for path in references:
            if path not in self._references:
                self._references[path] = self.encoder.embed_images([load_rgb(path)]).global_[0]
        embedding = self.encoder.embed_images([image]).global_[0]
        return float(sum(float(embedding @ self._references[p]) for p in references) / len(references))

    def apply(
        self,
        jobs: Sequence[Job],
        images: Sequence[Image.Image],
        regenerate: Callable[[list[Job], list[int]], list[Image.Image]],
    ) -> tuple[list[Image.Image], list[dict[str, Any]]]:
        """The best image of each job and its `quality` record, remaking those below the threshold.

        Args:
            regenerate: makes images for (jobs, seeds) with the pipeline, in one batch.

        Returns:
            (images, records): per job, the kept image, and `{"min_dino", "max_attempts", "passed",
            "attempts", "seed", "dino", "history": [{"seed", "dino"}, ...], "error"?}`: the sidecar's
            `quality`, which `squeeze eval` reads to mark the image as chosen by DINO.
        """
        best = list(images)
        records: list[dict[str, Any]] = []
        for job, image in zip(jobs, images, strict=True):
            dino = self.score(image, job.references)
            records.append(
                {
                    "min_dino": self.quality.min_dino,
                    "max_attempts": self.quality.max_attempts,
                    "history": [{"seed": job.seed, "dino": dino}],
                }
            )
        for attempt in range(1, self.quality.max_attempts):
            weak = [i for i, record in enumerate(records) if _best(record)["dino"] < self.quality.min_dino]
            if not weak:
                break
            seeds = [attempt_seed(jobs[i].seed, attempt) for i in weak]
            try:
                remade = regenerate([jobs[i] for i in weak], seeds)
            except Exception as error:  # out of memory, say: keep the best so far and say why it stopped
                for i in weak:
                    records[i]["error"] = f"attempt {attempt + 1} failed: {str(error).splitlines()[0][:300]}"
                break
            for i, seed, image in zip(weak, seeds, remade, strict=True):
                dino = self.score(image, jobs[i].references)
                if dino > _best(records[i])["dino"]:
                    best[i] = image
                records[i]["history"].append({"seed": seed, "dino": dino})
        for record in records:
            chosen = _best(record)
            record.update(
                passed=chosen["dino"] >= self.quality.min_dino,
                attempts=len(record["history"]),
                seed=chosen["seed"],
                dino=chosen["dino"],
            )
        return best, records


def _best(record: dict[str, Any]) -> dict[str, Any]:
    return max(record["history"], key=lambda attempt: attempt["dino"])


def quality_summary(records: Iterable[dict[str, Any]], quality: QualityGate) -> dict[str, Any]:
    """`run.json`'s `quality`: how many finished images (their index lines) were gated, remade, still fail."""
    gated = [record["quality"] for record in records if record.get("quality")]
    return {
        "min_dino": quality.min_dino,
        "max_attempts": quality.max_attempts,
        "gated": len(gated),
        "regenerated": sum(q["attempts"] > 1 for q in gated),
        "passed": sum(q["passed"] for q in gated),
        "still_failing": sum(not q["passed"] for q in gated),
    }
