"""From a validated manifest to a `LoadedManifest`: the recipe merged in, references found and checked,
placeholders substituted, the job limit enforced. Reads only YAML and image headers.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from squeeze_cli.errors import ManifestError, Problem, RecipeError
from squeeze_cli.images import image_hint
from squeeze_cli.manifest.feed import (
    Feed,
    FeedRow,
    Row,
    Scene,
    cell_text,
    feed_format,
    read_feed,
    resolve_row,
)
from squeeze_cli.manifest.globs import file_identity, glob_paths
from squeeze_cli.manifest.loaded import (
    LoadedManifest,
    ResolvedPrompt,
    ResolvedSubject,
    count_jobs,
    seeds_overlap,
    too_many_jobs,
)
from squeeze_cli.manifest.located import (
    FieldPath,
    Location,
    YamlDocument,
    apply_overrides,
    load_yaml,
    read_manifest_text,
    sort_problems,
)
from squeeze_cli.manifest.recipes import (
    COMMAND_LINE_PATHS_HINT,
    Recipe,
    load_recipe,
    merge_model,
    model_identity,
    model_path_fields,
    on_command_line,
    path_base,
    resolve_model_paths,
)
from squeeze_cli.manifest.reference_facts import ReferenceFacts
from squeeze_cli.manifest.schema import (
    DEFAULT_MAX_JOBS,
    RESERVED_SUBJECT_NAMES,
    SWEPT_KEYS,
    UNIQUE_NAMES_HINT,
    Manifest,
    ManifestHead,
    ModelSpec,
    PromptSpec,
    SamplingOverrides,
    SeedRange,
    Subject,
    SubjectFeed,
)
from squeeze_cli.manifest.schema_errors import validate_schema
from squeeze_cli.manifest.templates import Template
from squeeze_cli.model_checks import source_problems
from squeeze_cli.params import SamplingParams
from squeeze_cli.pipelines.registry import PIPELINES, pipeline_spec, unused_sampling_keys

EXTENSION_PREFIX = "x-"
# `https://...`, `file:///...`, `s3://...`: not a path (a path whose first folder ends in `:` would be odd).
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SeedSpec = list[int] | SeedRange | None


def _unicode_twin(path: str) -> str | None:
    """The name in `path`'s folder that is `path`'s name in another Unicode form (a photo copied from a Mac
    is named in NFD, `e` and a combining accent; a shop's export writes NFC, `é`), or None."""
    folder, name = os.path.split(path)
    if name.isascii():  # one form only: no folder to list for each missing photo of a feed
        return None
    wanted = unicodedata.normalize("NFC", name)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return None
    return next((other for other in names if unicodedata.normalize("NFC", other) == wanted), None)


def _key_path(level: FieldPath, *keys: str) -> FieldPath:
    """Where a key of a sampling level is: under the level, or the `recipe` line for the recipe's defaults
    (the recipe file is not the manifest)."""
    return level if level == ("recipe",) else (*level, *keys)


def load_manifest(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    recipe: str | None = None,
    max_jobs: int | None = None,
    check_sources: bool = True,
    allow_pickle: bool = False,
    output_dir: Path | None = None,
    reference_cache: bool = True,
) -> LoadedManifest:
    """Read, validate and resolve a manifest; nothing is loaded but the YAML and image headers.

    Args:
        path: the manifest file. References, the output dir and a recipe path are relative to its folder.
        overrides: ``dotted.path=value`` strings (``--set``), applied in order before validation.
        recipe: a preset name or path that replaces the manifest's `recipe` (``--recipe``).
        max_jobs: job limit (``--max-jobs``); beats the manifest's `max_jobs`, default `DEFAULT_MAX_JOBS`.
        check_sources: check that the model's local folders exist (and, with ``HF_HUB_OFFLINE``, that its
            hub ids are cached); off for reading a finished run's manifest where the weights are not.
        allow_pickle: accept a LoRA folder that holds only pickle (.bin) weights (``--allow-pickle``).
        output_dir: the output folder to use instead of `output.dir` (``--out``, absolute and checked).
        reference_cache: trust the output folder's `.squeeze-references.json` for photos whose stat is
            unchanged (`ReferenceFacts`); False reads every photo (``--verify``).

    Raises:
        `ManifestError`: with every problem found, each located in the file (or at the ``--set`` flag).
    """
    manifest_path = Path(path).expanduser().absolute()
    file = str(path)
    text = read_manifest_text(manifest_path, file)
    document = load_yaml(
        text,
        file,
        empty_hint="a manifest needs at least `version: 1`, a `recipe` and a `subjects` list "
        "(see docs/manifest.md)",
    )
    problems = list(document.problems)
    if document.data is None:
        raise ManifestError(problems)
    problems += apply_overrides(document, overrides)
    if isinstance(document.data, dict):
        # `x-...` keys hold YAML anchors to reuse (`x-prompts: &prompts [...]`, then `prompts: *prompts`),
        # as in compose files: their values were copied where the aliases point; the keys mean nothing.
        for key in [k for k in document.data if isinstance(k, str) and k.startswith(EXTENSION_PREFIX)]:
            del document.data[key]
    if recipe is not None and isinstance(document.data, dict):
        document.data["recipe"] = recipe
        document.marks[("recipe",)] = Location(f"--recipe {recipe}")

    # The top level and each subject are validated separately, so a typo in one subject does not hide
    # a missing reference in another: every check that can run does.
    parsed_head, head_problems = validate_schema(ManifestHead, document)
    head = parsed_head if isinstance(parsed_head, ManifestHead) else None
    problems += head_problems
    subjects: list[Subject | None] = []
    raw_subjects = document.data.get("subjects") if isinstance(document.data, dict) else None
    for index in range(len(raw_subjects) if isinstance(raw_subjects, list) else 0):
        subject, subject_problems = validate_schema(Subject, document, ("subjects", index))
        problems += subject_problems
        subjects.append(subject if isinstance(subject, Subject) else None)
    resolver = _Resolver(
        document,
        head,
        subjects,
        manifest_path,
        check_sources=check_sources,
        allow_pickle=allow_pickle,
        output_dir=output_dir,
        reference_cache=reference_cache,
    )
    loaded = resolver.resolve(max_jobs)
    problems += dict.fromkeys(resolver.problems)  # once, however many of a sweep's values share one
    if problems or loaded is None:
        raise ManifestError(sort_problems(problems))
    return loaded


def _holds(data: Any, path: FieldPath) -> bool:
    """Whether the nested mappings of `data` have a value at `path`."""
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


class _Resolver:
    """The semantic checks that need more than one field: recipe, references, placeholders, limits.

    Runs on whatever validated: with `head` None (a broken top level) only the subjects are checked.
    """

    def __init__(
        self,
        document: YamlDocument,
        head: Manifest | None,
        subjects: list[Subject | None],
        manifest_path: Path,
        *,
        check_sources: bool = True,
        allow_pickle: bool = False,
        output_dir: Path | None = None,
        reference_cache: bool = True,
    ):
        self.check_sources = check_sources
        self.allow_pickle = allow_pickle
        self.reference_cache = reference_cache
        self.out_flag = output_dir
        self.document = document
        self.head = head
        self.subjects = subjects
        self.manifest_path = manifest_path
        self.base_dir = manifest_path.parent
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.output_dir: Path | None = None  # resolved first: reference globs never reach into it
        self._written_folders: tuple[str, set[str]] | None = (
            None  # the real output folder, its folders' names
        )
        self.limit = DEFAULT_MAX_JOBS  # the job limit, known once the top level is read
        self.feed_names: set[str] = set()  # the subjects of `subjects_from`, once read
        self.feed_rows: dict[int, tuple[FeedRow, str]] = {}  # subject index -> its row, references column
        self.reference_facts = ReferenceFacts()  # from the output folder's cache, once it is known
        self._params: dict[SamplingParams, SamplingParams] = {}
        self._real_folders: dict[str, str] = {}  # a reference's folder -> its real path

    def problem(self, path: FieldPath, message: str, hint: str | None = None) -> None:
        self.problems.append(self.document.problem(path, message, hint))

    def path_base(self, path: FieldPath) -> Path:
        """Where a relative path at `path` starts: the current folder when a flag gave it (`--set`,
        `--recipe`), the manifest's folder when the manifest has it."""
        return path_base(self.document, path, self.base_dir)

    def relative_hint(self, path: FieldPath) -> str:
        if on_command_line(self.document.locate(path)):
            return f"{COMMAND_LINE_PATHS_HINT} {Path.cwd()}"
        return f"paths are relative to the manifest's folder {self.base_dir}"

    def resolve(self, max_jobs: int | None) -> LoadedManifest | None:
        head = self.head
        recipe, model = self.resolve_model(head) if head is not None else (None, None)
        output_dir = self.output_dir = self.resolve_output_dir(head) if head is not None else None
        if self.out_flag is not None:  # `output.dir` was still checked: a bad one is bad input all the same
            output_dir = self.output_dir = self.out_flag
        if output_dir is not None and self.reference_cache:  # photos unchanged since a run: not read again
            self.reference_facts = ReferenceFacts(output_dir)
        pipeline = pipeline_spec(model.pipeline_class).name if model is not None else None
        limit = self.limit = max_jobs or (head.max_jobs if head is not None else None) or DEFAULT_MAX_JOBS
        # Read before any reference is resolved: a glob must not reach into a feed subject's folder either.
        feed = self.read_feed(head.subjects_from) if head is not None and head.subjects_from else None
        names_seen: dict[str, str] = {}  # casefolded name -> where it is first used
        subjects = []
        for index, subject in enumerate(self.subjects):
            name = subject.name if subject is not None else self.raw_subject(index).get("name")
            if isinstance(name, str):
                folded = name.casefold()  # case-insensitive file systems would merge the folders
                if folded in names_seen:
                    self.problem(
                        ("subjects", index, "name"),
                        f"subject name {name!r} is already used by {names_seen[folded]}",
                        UNIQUE_NAMES_HINT,
                    )
                names_seen.setdefault(folded, f"subjects[{index}]")
            if subject is not None:
                subjects.append(self.resolve_subject(index, subject, recipe, pipeline))
            else:
                self.check_invalid_subject(index)
        if feed is not None and head is not None and head.subjects_from is not None:
            subjects += self.resolve_feed(
                head.subjects_from, feed, recipe, pipeline, names_seen, first=len(subjects)
            )

        total = count_jobs(subjects)
        if total > limit:
            # At the hand-written subjects, or at the feed when it alone makes them.
            only_feed = head is not None and head.subjects_from is not None and not self.subjects
            self.problem(("subjects_from",) if only_feed else ("subjects",), *too_many_jobs(total, limit))
        if model is not None and head is not None:
            self.check_sampling_keys(head, model, recipe)
        if model is not None:
            self.check_reference_limit(model, recipe, subjects)
        if recipe is not None and head is not None:
            self.check_license(head, recipe)
        # (`output_dir` is None only with a problem reported.)
        if self.problems or model is None or head is None or output_dir is None or None in self.subjects:
            return None
        fields = {name: getattr(head, name) for name in Manifest.model_fields if name != "subjects"}
        # The subjects go on as `subjects`, resolved: their validated models (~80 MB at 100,000 prompts)
        # are not kept twice.
        document = Manifest.model_construct(head.model_fields_set, **fields, subjects=[])
        return LoadedManifest(
            path=self.manifest_path,
            document=document,
            recipe=recipe,
            model=model,
            model_identity=model_identity(model),
            output_dir=output_dir,
            max_jobs=limit,
            subjects=tuple(subjects),
            warnings=tuple(dict.fromkeys(self.warnings)),  # one per place, however many prompts inherit it
            reference_facts=self.reference_facts,
        )

    # Subjects from a feed (`subjects_from`) ----------------------------------------------------------

    def read_feed(self, spec: SubjectFeed) -> Feed | None:
        """The feed's rows, with the names of their subjects noted; None when it cannot be read or lacks a
        mapped column (reported)."""
        place: FieldPath = ("subjects_from", "path")
        format = feed_format(spec.path, spec.format)
        if format is None:
            self.problem(
                ("subjects_from", "path"),
                f"cannot tell the format of {spec.path!r} from its name",
                "name a .csv, .jsonl or .parquet file, or set `format: csv|jsonl|parquet`",
            )
            return None
        if URL_PATTERN.match(spec.path):
            self.problem(
                place,
                f"{spec.path!r} is a URL: squeeze reads a local file",
                "download it first, e.g. `curl -fsS -o products.csv URL && squeeze gen ...`",
            )
            return None
        absolute = Path(self.path_base(place), os.path.expanduser(spec.path))
        if not absolute.exists():
            hint = None if os.path.isabs(os.path.expanduser(spec.path)) else self.relative_hint(place)
            self.problem(place, f"no such file: {spec.path!r}", hint)
            return None
        feed = read_feed(absolute, _shown_path(absolute), format)
        self.problems += feed.problems  # a bad line is one problem: the others are still checked
        if not feed.columns:
            return None
        mapped = {
            "name": spec.name,
            "class": spec.class_column,
            "references": spec.references,
            "prompts": spec.prompts,
        }
        missing = {key: column for key, column in mapped.items() if column and column not in feed.columns}
        for key, column in missing.items():
            self.problem(
                ("subjects_from", key),
                f"{feed.file} has no column {column!r}",
                f"its columns: {', '.join(feed.columns)}",
            )
        if missing:
            return None
        if not feed.rows and not feed.problems:
            self.problem(place, f"{feed.file} has no rows", "one product per row, below the header")
        self.feed_names = {name for row in feed.rows if (name := cell_text(row.values.get(spec.name)))}
        return feed

    def resolve_feed(
        self,
        spec: SubjectFeed,
        feed: Feed,
        recipe: Recipe | None,
        pipeline: str | None,
        names_seen: dict[str, str],
        first: int,
    ) -> list[ResolvedSubject]:
        """One subject per row: the shared scenes (read once), then the row's own prompts."""
        levels = self.default_levels(recipe)
        scene_levels = [(("subjects_from", "scenes", i), scene) for i, scene in enumerate(spec.scenes)]
        swept = [
            _key_path(where, key)
            for where, level in [*levels, *scene_levels]
            for key, value in level.explicit(pipeline).items()
            if isinstance(value, list)
        ]
        for where in swept:
            self.problem(
                where,
                "a sweep (a list of values) is not available with `subjects_from` yet",
                "give one value, or list the subjects under `subjects`",
            )
        if swept:
            return []
        base, base_seeds = _merged(levels, pipeline)
        known = {"subject", "class", *feed.columns}
        built_in = {"subject": spec.name, "class": spec.class_column}  # placeholder: the column it fills from
        scenes: list[Scene] = []
        for index, scene in enumerate(spec.scenes):
            scene_path: FieldPath = ("subjects_from", "scenes", index)
            text_path = self.text_path(scene_path)
            template = Template(scene.text)
            for message, hint in template.problems:
                self.problem(text_path, message, hint)
            for name in dict.fromkeys(template.names):
                if name == "class" and spec.class_column is None:
                    self.problem(
                        text_path,
                        "uses {class}, but `subjects_from` maps no class column",
                        "set `class: COLUMN`",
                    )
                elif name not in known:
                    self.problem(
                        text_path,
                        f"unknown placeholder {{{name}}}: {feed.file} has no such column",
                        f"known: {{subject}}, {{class}} and the columns {', '.join(feed.columns)}",
                    )
                elif name in built_in and name in feed.columns and built_in[name] != name:
                    # {subject} is the name column's cell, {class} the class column's: the feed's own column
                    # of that name would never reach the prompt, without a word.
                    mapped = "name" if name == "subject" else "class"
                    self.problem(
                        text_path,
                        f"{{{name}}} is ambiguous: {feed.file} has a column {name!r}, and {{{name}}} is the "
                        f"cell of the `{mapped}:` column",
                        f"map `{mapped}: {name}` in `subjects_from` if that column is meant, or rename it",
                    )
            params, seeds = _prompt_params(base, base_seeds, scene, pipeline)
            self.check_prompt(scene_path, params, [*levels, (scene_path, scene)])
            scenes.append(Scene(template, params, seeds, self.document.locate(text_path)))

        subjects: list[ResolvedSubject] = []
        for row in feed.rows:
            inherited = Row(feed.path.parent, base, _seed_values(base_seeds), first + len(subjects))
            subject, row_problems = resolve_row(
                spec, row, scenes, inherited, names_seen, self.find_references
            )
            self.problems += row_problems
            if subject is not None:
                subjects.append(subject)
                self.feed_rows[subject.index] = (row, spec.references)
        return subjects

    def resolve_output_dir(self, head: Manifest) -> Path | None:
        """The output folder, absolute. Any place is allowed (it is the user's choice), but it must be a
        folder or creatable as one: a file in the way is reported now rather than after the model loads."""
        written = head.output.dir
        path: FieldPath = ("output", "dir")
        if "\0" in written:
            self.problem(path, f"{written!r} contains a NUL character", "remove it from the path")
            return None
        output_dir = Path(os.path.expanduser(written))
        if not output_dir.is_absolute():
            output_dir = (self.path_base(path) / output_dir).resolve()
        reason = output_dir_problem(output_dir)
        if reason:
            self.problem(
                path,
                f"{written!r} cannot be the output folder: {reason}",
                "choose another `output.dir` (or `--out`)",
            )
        return output_dir

    # The model: recipe < manifest `model:` ------------------------------------------------------------

    def resolve_model(self, head: Manifest) -> tuple[Recipe | None, ModelSpec | None]:
        recipe = None
        if head.recipe is not None:
            try:
                recipe = load_recipe(
                    head.recipe,
                    relative_to=self.path_base(("recipe",)),
                    relative_hint=(
                        COMMAND_LINE_PATHS_HINT
                        if on_command_line(self.document.locate(("recipe",)))
                        else "recipe paths are relative to the manifest's folder"
                    ),
                )
            except RecipeError as error:
                self.problem(("recipe",), error.message, error.hint)
                return None, None
            except ManifestError as error:  # a broken recipe file: its own located problems
                self.problems += error.problems
                return None, None
        elif head.model is None:
            self.problem(
                (),
                "no model: the manifest sets neither `recipe` nor `model`",
                "add `recipe: tiny` to try the tool, or see `squeeze recipes` for the presets",
            )
            return None, None

        base = recipe.model.model_dump(exclude_unset=True) if recipe is not None else {}
        merged = merge_model(base, head.model or {})
        # Paths that `--set` gave start from the current folder; a packaged preset's are the manifest's.
        # Only a path the manifest's section (with its --set values) holds: one the recipe alone gives may
        # sit in a mapping a --set created (`model.lora` of `--set model.lora.scale=0.5`), located there.
        written = [field for field in model_path_fields(merged) if _holds(head.model or {}, field)]
        from_cwd = [field for field in written if on_command_line(self.document.locate(("model", *field)))]
        # Validate the merged section where the manifest wrote it, so locations point into the manifest;
        # keys that only the recipe sets are located at the manifest's `recipe:` line (or `--recipe`).
        self.document.data["model"] = merged
        if ("recipe",) in self.document.marks:
            for field in [("model",)] + [
                ("model", *f) for f in model_path_fields(merged) if f not in written
            ]:
                self.document.marks.setdefault(field, self.document.marks[("recipe",)])
        parsed, problems = validate_schema(ModelSpec, self.document, ("model",))
        self.problems += problems
        if not isinstance(parsed, ModelSpec):
            return recipe, None
        spec = resolve_model_paths(parsed, self.base_dir, from_cwd=from_cwd)
        # Missing weights are input errors too: found here, before `gen` loads anything.
        for problem in source_problems(spec, allow_pickle=self.allow_pickle) if self.check_sources else ():
            self.problem(_dotted_path(problem.field), problem.message, problem.hint)
        return recipe, spec

    # Subjects ---------------------------------------------------------------------------------------

    def text_path(self, prompt_path: FieldPath) -> FieldPath:
        """Where a prompt's text is written: its `text` key, or the prompt itself when written as a string."""
        text_path = (*prompt_path, "text")
        return text_path if text_path in self.document.marks else prompt_path

    def raw_subject(self, index: int) -> dict[str, Any]:
        raw = self.document.data["subjects"][index]
        return raw if isinstance(raw, dict) else {}

    def check_invalid_subject(self, index: int) -> None:
        """The checks that still make sense for a subject that failed validation: references, placeholders."""
        raw = self.raw_subject(index)
        path: FieldPath = ("subjects", index)
        references = raw.get("references")
        if isinstance(references, list) and all(isinstance(r, str) for r in references):
            self.resolve_references(path, references)
        name, noun = raw.get("name"), raw.get("class")
        stand_in = Subject.model_construct(
            name=name if isinstance(name, str) else "", class_noun=noun if isinstance(noun, str) else None
        )
        prompts = raw.get("prompts")
        for prompt_index, prompt in enumerate(prompts if isinstance(prompts, list) else []):
            text = prompt.get("text") if isinstance(prompt, dict) else prompt
            if isinstance(text, str):
                self.substitute(self.text_path((*path, "prompts", prompt_index)), text, stand_in)

    def default_levels(self, recipe: Recipe | None) -> list[tuple[FieldPath, SamplingOverrides]]:
        """The levels every subject's parameters start from: the recipe's defaults, then the manifest's."""
        levels: list[tuple[FieldPath, SamplingOverrides]] = []
        if recipe is not None:
            levels.append(((), recipe.defaults))
        defaults = self.head.defaults if self.head is not None else SamplingOverrides()
        return [*levels, (("defaults",), defaults)]

    def resolve_subject(
        self, index: int, subject: Subject, recipe: Recipe | None, pipeline: str | None
    ) -> ResolvedSubject:
        path: FieldPath = ("subjects", index)
        references = self.resolve_references(path, subject.references)
        levels = [*self.default_levels(recipe), (path, subject)]
        inherited, base_seeds = _merged_values(levels, pipeline)

        prompts: list[ResolvedPrompt] = []
        seen: dict[tuple[str, SamplingParams], list[tuple[int, Sequence[int]]]] = {}
        for prompt_index, spec in enumerate(subject.prompts):
            prompt_path = (*path, "prompts", prompt_index)
            seeds = _seed_values(spec.seeds if spec.seeds is not None else base_seeds)
            text_path = self.text_path(prompt_path)
            text = self.substitute(text_path, spec.text, subject)
            location = self.document.locate(text_path)
            for params, sweep in self.sweep_variants(prompt_path, {**inherited, **spec.explicit(pipeline)}):
                self.check_prompt(prompt_path, params, [*levels, (prompt_path, spec)])
                for other, other_seeds in seen.get((text, params), []):
                    if seeds_overlap(seeds, other_seeds):
                        self.problem(
                            prompt_path,
                            f"same text, parameters and seeds as prompts[{other}]: the images would be "
                            "identical",
                            "remove it, or give it different seeds",
                        )
                        break
                seen.setdefault((text, params), []).append((prompt_index, seeds))
                prompts.append(ResolvedPrompt(len(prompts), spec.text, text, params, seeds, location, sweep))
        return ResolvedSubject(index, subject.name, subject.class_noun, references, tuple(prompts))

    def sweep_variants(
        self, prompt_path: FieldPath, values: dict[str, Any]
    ) -> list[tuple[SamplingParams, tuple[tuple[str, Any], ...]]]:
        """A prompt's parameters, one set per combination of its swept keys' values (the cartesian product,
        the first swept key varying slowest), each with the `(key, value)` pairs it takes from the sweeps."""
        swept = [key for key in SWEPT_KEYS if isinstance(values.get(key), list)]
        fixed = self.shared(SamplingParams(**{k: v for k, v in values.items() if k not in swept}))
        if not swept:
            return [(fixed, ())]
        combinations = math.prod(len(values[key]) for key in swept)
        if combinations > self.limit:  # found before building them: `[1..1000]` on three keys is 10^9
            self.problem(
                prompt_path,
                f"its sweeps make {combinations:,} sets of parameters, more than the job limit of "
                f"{self.limit:,}",
                "sweep fewer values, or raise the limit with `--max-jobs N` or `max_jobs: N`",
            )
            return [(fixed, ())]
        lists: list[list[Any]] = [values[key] for key in swept]
        sweeps = [tuple(zip(swept, chosen, strict=True)) for chosen in itertools.product(*lists)]
        return [(self.shared(replace(fixed, **dict(sweep))), sweep) for sweep in sweeps]

    def shared(self, params: SamplingParams) -> SamplingParams:
        """One object per distinct set of parameters: 100,000 prompts mostly share a few."""
        return self._params.setdefault(params, params)

    def substitute(self, text_path: FieldPath, template: str, subject: Subject) -> str:
        """`template` with its placeholders filled in; problems with them are located at `text_path`."""
        parsed = Template(template)
        for message, hint in parsed.problems:
            self.problem(text_path, message, hint)
        values = {"subject": subject.name, "class": subject.class_noun}
        for name in parsed.names:
            if name not in values:
                self.problem(
                    text_path,
                    f"unknown placeholder {{{name}}}",
                    "known: {subject}, {class}; write {{ and }} for literal braces",
                )
            elif values[name] is None:
                self.problem(
                    text_path, "uses {class} but the subject has no class noun", "add `class: <noun>` to it"
                )
        text = parsed.fill(values)
        if not text.strip():
            self.problem(text_path, "the prompt is empty")
        return text

    def check_sampling_keys(self, head: Manifest, model: ModelSpec, recipe: Recipe | None) -> None:
        """A sampling key the model's pipeline does not read is an error where it is set, rather than a value
        silently dropped while the metadata claims it was used; so is a key in a `for_pipeline` block that its
        own pipeline does not read."""
        name = pipeline_spec(model.pipeline_class).name
        levels: list[tuple[FieldPath, SamplingOverrides]] = []
        if recipe is not None:
            levels.append((("recipe",), recipe.defaults))
        levels.append((("defaults",), head.defaults))
        for index, subject in enumerate(self.subjects):
            if subject is not None:
                levels.append((("subjects", index), subject))
                levels += [(("subjects", index, "prompts", i), p) for i, p in enumerate(subject.prompts)]
        scenes = head.subjects_from.scenes if head.subjects_from is not None else []
        levels += [(("subjects_from", "scenes", i), scene) for i, scene in enumerate(scenes)]
        used_by = f"the {name} pipeline" + (f" (recipe {recipe.name})" if recipe is not None else "")
        reads = ", ".join(sorted(pipeline_spec(name).sampling_parameters))
        for path, level in levels:
            self.check_step_cache_method(_key_path(path, "step_cache"), name, used_by, level.explicit())
            for key in unused_sampling_keys(name, sorted(level.explicit())):
                self.problem(
                    _key_path(path, key),
                    f"`{key}` is not used by {used_by}",
                    f"remove it, or move it under `for_pipeline: {{PIPELINE: ...}}` for another recipe's "
                    f"pipeline; {name} reads: {reads}",
                )
            for block_name, block in (level.for_pipeline or {}).items():
                if block_name not in PIPELINES:
                    where = _key_path(path, "for_pipeline", block_name)
                    self.problem(
                        where, f"no pipeline is called {block_name!r}", f"pipelines: {', '.join(PIPELINES)}"
                    )
                    continue
                block_reads = ", ".join(sorted(pipeline_spec(block_name).sampling_parameters))
                self.check_step_cache_method(
                    _key_path(path, "for_pipeline", block_name, "step_cache"),
                    block_name,
                    f"the {block_name} pipeline",
                    block.explicit(),
                )
                for key in unused_sampling_keys(block_name, sorted(block.explicit())):
                    self.problem(
                        _key_path(path, "for_pipeline", block_name, key),
                        f"`{key}` is not used by the {block_name} pipeline",
                        f"remove it; {block_name} reads: {block_reads}",
                    )

    def check_step_cache_method(self, where: FieldPath, name: str, used_by: str, values: dict) -> None:
        """A `step_cache` whose method the pipeline's transformer cannot run under diffusers' hooks is an
        error where it is set (FLUX.2's blocks break First Block Cache), not a crash mid-run."""
        step_cache = values.get("step_cache")
        takes = pipeline_spec(name).step_cache_methods
        if step_cache is None or step_cache.method in takes:
            return
        self.problem(
            where,
            f"step cache method {step_cache.method} does not run on {used_by}",
            f"use `method: {' or '.join(sorted(takes))}`, or leave step_cache out for {name}",
        )

    def check_reference_limit(
        self, model: ModelSpec, recipe: Recipe | None, subjects: Sequence[ResolvedSubject]
    ) -> None:
        """A subject with more references (globs expanded) than the model's pipeline conditions on is an
        error, rather than references silently left out."""
        spec = pipeline_spec(model.pipeline_class)
        if spec.max_references is None:
            return
        used_by = f"the {spec.name} pipeline" + (f" (recipe {recipe.name})" if recipe is not None else "")
        for subject in subjects:
            if len(subject.references) > spec.max_references:
                message = (
                    f"{len(subject.references)} reference images, more than the {spec.max_references} "
                    f"{used_by} conditions on"
                )
                hint = f"keep at most {spec.max_references} for this subject"
                if subject.index in self.feed_rows:  # a feed's row: at its line
                    row, column = self.feed_rows[subject.index]
                    self.problems.append(row.problem(column, message, hint))
                else:
                    self.problem(("subjects", subject.index, "references"), message, hint)

    def check_license(self, head: Manifest, recipe: Recipe) -> None:
        """Warn, once, that the recipe's weights may not be used commercially, unless acknowledged."""
        if recipe.license.commercial_use is False and head.acknowledge_license != "non-commercial":
            self.warnings.append(
                self.document.problem(
                    ("recipe",),
                    f"{recipe.name!r} runs weights under the {recipe.license.name}, which does not allow "
                    "commercial use",
                    "read the licence before using these images in a business; "
                    "`acknowledge_license: non-commercial` in the manifest silences this warning",
                )
            )

    def check_prompt(
        self, path: FieldPath, params: SamplingParams, levels: list[tuple[FieldPath, SamplingOverrides]]
    ) -> None:
        if params.negative_prompt and params.true_cfg_scale <= 1.0:
            where = next(
                (p for p, lvl in reversed(levels) if "negative_prompt" in lvl.model_fields_set), path
            )
            self.warnings.append(
                self.document.problem(
                    (*where, "negative_prompt") if where else ("recipe",),
                    "is ignored: a negative prompt is used only with true CFG (true_cfg_scale > 1)",
                    "set `true_cfg_scale: 4.0` (for example; each image then takes twice as long) "
                    "or remove `negative_prompt`",
                )
            )
        if params.true_cfg_scale > 1.0 and params.negative_prompt is None:
            where = next((p for p, lvl in reversed(levels) if "true_cfg_scale" in lvl.model_fields_set), path)
            self.problem(
                (*where, "true_cfg_scale") if where else ("recipe",),
                "true_cfg_scale > 1 has no effect without a negative_prompt",
                'set `negative_prompt` (an empty one is `negative_prompt: ""`)',
            )

    def written_by_squeeze(self, file: str) -> bool:
        """Whether `file` lies where a run of this manifest writes: a subject's folder in the output folder
        (its images, sidecars, grids and contact sheets), the views folder, the shards' run files, or the
        run files at the top of OUT (`index.jsonl`, `run.json`, ...), links resolved. A user may keep the
        photos in the output folder itself (`--out photos` with `photos/*`): its run files are not photos."""
        if self.output_dir is None:
            return False
        if self._written_folders is None:
            names = {subject.name for subject in self.subjects if subject is not None} | self.feed_names
            names |= RESERVED_SUBJECT_NAMES  # the run files and `shards`
            if self.head is not None and self.head.output.views_dir is not None:
                names.add(self.head.output.views_dir)
            self._written_folders = (os.path.realpath(self.output_dir), names)
        out, names = self._written_folders
        # A glob's matches share their folder: resolve it once (not each file's whole path), and the file
        # itself only when it is a link.
        folder, name = os.path.split(file)
        if folder not in self._real_folders:
            self._real_folders[folder] = os.path.realpath(folder)
        real = (
            os.path.realpath(file) if os.path.islink(file) else os.path.join(self._real_folders[folder], name)
        )
        # One look at the first folder under OUT, not one per subject: 10,000 subjects' globs stay linear.
        return _inside(real, out) and os.path.relpath(real, out).split(os.sep)[0] in names

    def resolve_references(self, path: FieldPath, patterns: list[str]) -> tuple[str, ...]:
        """A manifest subject's references: relative to the manifest's folder (the current folder for
        `--set`), problems at each pattern's place."""
        places = [(*path, "references", index) for index in range(len(patterns))]
        return self.find_references(
            patterns,
            [self.path_base(place) for place in places],
            [self.relative_hint(place) for place in places],
            lambda index, message, hint: self.problem(places[index], message, hint),
        )

    def find_references(
        self,
        patterns: Sequence[str],
        bases: Sequence[Path],
        hints: Sequence[str],
        report: Callable[[int, str, str | None], None],
    ) -> tuple[str, ...]:
        """The image files `patterns` name (each relative to its base), sorted and deduplicated; a
        problem with pattern `i` goes to `report(i, message, hint)`."""
        found: dict[str, int] = {}  # file -> index of the first pattern that named it
        from_glob: set[str] = set()
        for ref_index, pattern in enumerate(patterns):
            # Where relative paths start from helps only with relative paths.
            folder_hint = None if os.path.isabs(os.path.expanduser(pattern)) else hints[ref_index]
            if "\0" in pattern:
                report(ref_index, f"{pattern!r} contains a NUL character", "remove it from the path")
                continue
            if URL_PATTERN.match(pattern):  # a shop export's photo column often holds its CDN's URLs
                report(
                    ref_index,
                    f"{pattern!r} is a URL: squeeze reads local image files only",
                    f"download the photos and give their paths; {hints[ref_index]}",
                )
                continue
            absolute = os.path.join(bases[ref_index], os.path.expanduser(pattern))
            if glob.has_magic(pattern):
                matches = [m for m in glob_paths(absolute) if os.path.isfile(m)]
                # squeeze's own images, grids and sidecars are never references: a glob that reaches into
                # the output folder would take a run's images into the next run's job ids, for ever.
                outputs = [m for m in matches if self.written_by_squeeze(m)]
                matches = [m for m in matches if m not in outputs]
                if not matches:
                    if outputs:
                        folder_hint = (
                            f"it matches only files squeeze writes in the output folder "
                            f"{self.output_dir}: keep the photos elsewhere"
                        )
                    report(ref_index, f"no file matches {pattern!r}", folder_hint)
                for match in matches:
                    normalized = os.path.normpath(match)
                    found.setdefault(normalized, ref_index)
                    from_glob.add(normalized)
            elif os.path.islink(absolute) and not os.path.exists(absolute):
                report(
                    ref_index,
                    f"{pattern!r} is a broken symbolic link (to {os.readlink(absolute)!r})",
                    "point it at an existing image, or list the image itself",
                )
            elif not os.path.exists(absolute):
                if (twin := _unicode_twin(absolute)) is not None:
                    folder_hint = (
                        f"its folder has {ascii(twin)}, the same name in another Unicode form: rename the "
                        "file, or write the path as it is"
                    )
                elif "\\" in pattern:  # a feed exported on Windows
                    folder_hint = (
                        "write the path with `/`: here `\\` is part of a file's name, not a folder separator"
                    )
                report(ref_index, f"no such file: {pattern!r}", folder_hint)
            elif os.path.isdir(absolute):
                report(
                    ref_index,
                    f"{pattern!r} is not a file",
                    f"to use every image in it: '{pattern.rstrip('/')}/*'",
                )
            elif not os.path.isfile(absolute):  # a device, a pipe, a socket: never open those
                report(ref_index, f"{pattern!r} is not a regular file", "list image files only")
            else:
                found.setdefault(os.path.normpath(absolute), ref_index)
        # One file reached by two paths (a symbolic link, a hard link, two patterns) is one reference.
        by_file: dict[object, str] = {}
        for reference in sorted(found):
            by_file.setdefault(file_identity(reference), reference)
        references = tuple(by_file.values())
        for reference in references:
            message = self.reference_facts.check(reference)
            if message:
                shown = os.path.relpath(reference, bases[found[reference]])
                hint = image_hint(message)
                if reference in from_glob and message.startswith("not a readable image"):
                    hint = f"{patterns[found[reference]]!r} matches it: narrow the pattern, e.g. to *.jpg"
                report(found[reference], f"{shown}: {message}", hint)
        return references


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def output_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be an output folder (a file is in the way), or None; creates nothing.

    For `output.dir` here and for `--out` (which the manifest does not see)."""
    if "\0" in str(path):
        return "the path contains a NUL character"
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir():
        return None
    return f"{'it' if existing == path else repr(str(existing))} is a file, not a folder"


def _dotted_path(field: str) -> FieldPath:
    return tuple(field.split("."))


def _merged_values(
    levels: Sequence[tuple[FieldPath, SamplingOverrides]], pipeline: str | None
) -> tuple[dict[str, Any], SeedSpec]:
    """The sampling keys (a value, or a sweep's list) and the seeds that `levels` set for `pipeline`, later
    levels winning."""
    values: dict[str, Any] = {}
    for _, level in levels:
        values.update(level.explicit(pipeline))
    return values, next((level.seeds for _, level in reversed(levels) if level.seeds is not None), None)


def _merged(
    levels: Sequence[tuple[FieldPath, SamplingOverrides]], pipeline: str | None
) -> tuple[SamplingParams, SeedSpec]:
    """The parameters and the seeds that `levels` set for `pipeline` (no sweep among them)."""
    values, seeds = _merged_values(levels, pipeline)
    return replace(SamplingParams(), **values), seeds


def _prompt_params(
    base: SamplingParams, base_seeds: SeedSpec, prompt: PromptSpec, pipeline: str | None
) -> tuple[SamplingParams, Sequence[int]]:
    """A prompt's parameters and seeds for `pipeline`: its own overrides on those of its subject."""
    overrides = prompt.explicit(pipeline)
    params = replace(base, **overrides) if overrides else base
    return params, _seed_values(prompt.seeds if prompt.seeds is not None else base_seeds)


def _shown_path(path: Path) -> str:
    """A feed's path in problems: relative to the current folder when it is inside it, else absolute."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def _seed_values(spec: SeedSpec) -> Sequence[int]:
    if spec is None:
        return (0,)
    if isinstance(spec, SeedRange):
        return spec.seeds()
    return tuple(spec)
