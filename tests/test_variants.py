"""Channel variants (`output.variants`) and what image files carry (`output.metadata`): made by `gen`
from the PNG masters, read back by the tools people use (sd-parsers, exiftool when installed), redone
only when their spec or file changes."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageCms
from support import flip_byte_in_place
from test_outputs import make_job, make_record
from test_runner import two_processes

from squeeze_cli.gen.runner import variant_shares
from squeeze_cli.manifest.schema import OutputVariant
from squeeze_cli.outputs.layout import image_stem
from squeeze_cli.outputs.records import PNG_FILE_KEY, PNG_PARAMETERS_KEY, PNG_RECORD_KEY, encode_png
from squeeze_cli.outputs.resume import Finished
from squeeze_cli.outputs.variants import encode_variant, fit_image, srgb_profile
from squeeze_cli.plan import shard_jobs

MANIFEST = """\
version: 1
recipe: tiny
output:
  dir: out
  grids: false
  contact_sheet: false
  metadata: {metadata}
  variants:
    - {{name: amazon, size: 96x96, fit: pad, format: jpeg}}
    - {{name: social, size: 48x60, fit: crop, format: webp, quality: {social_quality}}}
    - {{name: thumb, size: 40x20, fit: contain, format: png}}
defaults: {{height: 64, width: 32, num_inference_steps: 2, seeds: [0, 1]}}
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts: ["a {{class}} on a rug"]
"""
VARIANT_FILES = {
    "amazon": "dog/variants/amazon/000-s{seed}.jpg",
    "social": "dog/variants/social/000-s{seed}.webp",
    "thumb": "dog/variants/thumb/000-s{seed}.png",
}


def write_manifest(project: Path, *, metadata: str = "full", social_quality: int = 80) -> Path:
    path = project / "m.yaml"
    path.write_text(MANIFEST.format(metadata=metadata, social_quality=social_quality))
    return path


def identities(out: Path) -> dict[str, tuple[int, int]]:
    """Each file's inode and modification time: an atomic rewrite, a run later, changes them (the inode
    alone may be reused), a rename keeps both."""
    files = [path for path in sorted(out.rglob("*.*")) if not path.name.startswith(".")]  # not the locks
    return {str(path.relative_to(out)): _identity(path) for path in files}


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


@pytest.fixture(scope="module")
def run(tmp_path_factory, squeeze):
    project = tmp_path_factory.mktemp("variants")
    shutil.copytree(Path(__file__).parents[1] / "examples" / "images", project / "images")
    result = squeeze("gen", str(write_manifest(project)), "--quiet")
    assert result.code == 0, result.err[-3000:]
    return project


def test_every_finished_image_gets_its_variants_recorded_in_sidecar_and_index(run: Path) -> None:
    out = run / "out"
    index = {line["image"]: line for line in map(json.loads, (out / "index.jsonl").read_text().splitlines())}
    for seed in (0, 1):
        sidecar = json.loads((out / f"dog/000-s{seed}.json").read_text())
        files = {name: pattern.format(seed=seed) for name, pattern in VARIANT_FILES.items()}
        assert {name: entry["file"] for name, entry in sidecar["variants"].items()} == files
        assert index[f"dog/000-s{seed}.png"]["variants"] == files
        assert sidecar["variants"]["social"]["spec"]["quality"] == 80
        assert sidecar["variants"]["amazon"]["spec"]["quality"] == 90  # the default for jpeg
        sizes = {name: Image.open(out / file).size for name, file in files.items()}
        # 32x64 master: pad and crop give the box; contain fits it inside 40x20 keeping 1:2.
        assert sizes == {"amazon": (96, 96), "social": (48, 60), "thumb": (10, 20)}
        for file in files.values():
            assert Image.open(out / file).info["icc_profile"] == srgb_profile()


def test_the_resolved_manifest_keeps_the_variants_and_replans_the_run(run: Path, squeeze) -> None:
    import yaml

    resolved = yaml.safe_load((run / "out/manifest.resolved.yaml").read_text())
    assert [variant["name"] for variant in resolved["output"]["variants"]] == list(VARIANT_FILES)
    assert squeeze("status", str(run / "out")).code == 0  # it loads, and every job is done


def test_jpeg_and_webp_carry_the_parameters_as_a1111_tools_read_them(run: Path) -> None:
    from sd_parsers import ParserManager

    out = run / "out"
    record = json.loads((out / "dog/000-s1.json").read_text())
    for name in VARIANT_FILES:
        info = ParserManager().parse(out / VARIANT_FILES[name].format(seed=1))
        assert info is not None, name
        sampler = info.samplers[0]
        assert info.generator.name == "AUTOMATIC1111"
        assert sampler.parameters["seed"] == "1" and sampler.parameters["steps"] == "2"
        assert sampler.prompts[0].value == record["prompt"]
        assert info.metadata["Job id"] == record["job_id"]


@pytest.mark.skipif(shutil.which("exiftool") is None, reason="exiftool is not installed")
def test_exiftool_reads_the_parameters_and_the_srgb_profile_of_every_format(run: Path) -> None:
    from squeeze_cli.outputs.records import read_png_parameters

    out = run / "out"
    parameters = read_png_parameters(out / "dog/000-s0.png")
    for name, tag in (("amazon", "UserComment"), ("social", "UserComment"), ("thumb", "Parameters")):
        path = out / VARIANT_FILES[name].format(seed=0)
        shown = subprocess.run(
            ["exiftool", "-j", f"-{tag}", "-ICC_Profile:ProfileDescription", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        tags = json.loads(shown.stdout)[0]
        assert tags[tag] == parameters, name
        assert tags["ProfileDescription"] == "sRGB built-in"


def test_a_rerun_leaves_everything_alone_and_a_changed_spec_redoes_only_that_variant(
    run: Path, squeeze
) -> None:
    out = run / "out"
    before = identities(out)
    result = squeeze("gen", str(write_manifest(run)), "--quiet")
    assert result.code == 0, result.err[-3000:]
    after = identities(out)
    rewritten_every_run = {"run.json"}  # (manifest.resolved.yaml only when the plan changes)
    assert {name for name in after if after[name] != before.get(name)} == rewritten_every_run

    result = squeeze("gen", str(write_manifest(run, social_quality=60)), "--quiet")
    assert result.code == 0, result.err[-3000:]
    changed = {name for name, identity in identities(out).items() if after.get(name) != identity}
    assert changed - {"run.json", "manifest.resolved.yaml", "index.jsonl"} == {
        "dog/variants/social/000-s0.webp",
        "dog/variants/social/000-s1.webp",
        "dog/000-s0.json",  # the sidecar records the new spec; the PNG master is not made again
        "dog/000-s1.json",
    }
    sidecar = json.loads((out / "dog/000-s0.json").read_text())
    assert sidecar["variants"]["social"]["spec"]["quality"] == 60


def test_a_damaged_or_missing_variant_is_made_again(run: Path, squeeze) -> None:
    out = run / "out"
    jpeg = out / "dog/variants/amazon/000-s0.jpg"
    good = jpeg.read_bytes()
    jpeg.write_bytes(good[: len(good) // 2])
    (out / "dog/variants/thumb/000-s1.png").unlink()
    result = squeeze("gen", str(write_manifest(run, social_quality=60)), "--quiet")
    assert result.code == 0, result.err[-3000:]
    assert jpeg.read_bytes() == good  # the same master and spec give the same bytes
    assert (out / "dog/variants/thumb/000-s1.png").is_file()


# A rerun trusts a variant by its stat, as a PNG master ------------------------------------------------


def _count_variant_reads(monkeypatch) -> tuple[list[str], list[str], list[str]]:
    """(files hashed, sidecars read by `make_variants`, paths it resolved with `safe_join`)."""
    from squeeze_cli.outputs import resume, variants

    hashed: list[str] = []
    sidecars: list[str] = []
    joined: list[str] = []
    real_hash, real_read, real_join = resume.file_sha256, variants.read_sidecar, variants.safe_join
    monkeypatch.setattr(resume, "file_sha256", lambda path: hashed.append(str(path)) or real_hash(path))
    monkeypatch.setattr(variants, "read_sidecar", lambda path: sidecars.append(str(path)) or real_read(path))
    monkeypatch.setattr(variants, "safe_join", lambda *a: joined.append(a) or real_join(*a))
    return hashed, sidecars, joined


def test_a_no_op_rerun_reads_no_variant_and_no_sidecar_twice(tmp_path: Path, squeeze, monkeypatch) -> None:
    manifest = fresh_project(tmp_path)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    out = tmp_path / "out"
    for seed in (0, 1):  # each variant's stat after its atomic write, as a PNG master's
        for name, entry in json.loads((out / f"dog/000-s{seed}.json").read_text())["variants"].items():
            info = (out / entry["file"]).stat()
            assert (entry["mtime_ns"], entry["inode"]) == (info.st_mtime_ns, info.st_ino), name
    hashed, sidecars, joined = _count_variant_reads(monkeypatch)
    before = identities(out)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    assert hashed == [] and sidecars == [] and joined == []
    assert {name for name, identity in identities(out).items() if before[name] != identity} == {"run.json"}


def test_a_variant_edited_with_its_mtime_put_back_is_remade_by_verify(tmp_path: Path, squeeze) -> None:
    manifest = fresh_project(tmp_path)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    webp = tmp_path / "out" / VARIANT_FILES["social"].format(seed=1)
    good = webp.read_bytes()
    flip_byte_in_place(webp, -30)
    edited = webp.read_bytes()
    assert edited != good
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    assert webp.read_bytes() == edited  # trusted by its stat, as documented (as a PNG master)
    assert squeeze("gen", str(manifest), "--quiet", "--verify").code == 0
    assert webp.read_bytes() == good


def test_a_replaced_variant_is_remade_without_verify(tmp_path: Path, squeeze) -> None:
    manifest = fresh_project(tmp_path)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    jpeg = tmp_path / "out" / VARIANT_FILES["amazon"].format(seed=0)
    good = jpeg.read_bytes()
    other = tmp_path / "other.jpg"
    other.write_bytes(bytes(len(good)))  # same size, other bytes, another inode
    other.replace(jpeg)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    assert jpeg.read_bytes() == good


def test_an_old_variant_entry_without_a_stat_is_hashed_once_then_stamped(
    tmp_path: Path, squeeze, monkeypatch
) -> None:
    manifest = fresh_project(tmp_path)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    out = tmp_path / "out"
    sidecar = out / "dog/000-s0.json"
    record = json.loads(sidecar.read_text())
    stamps = {
        name: {key: entry.pop(key) for key in ("mtime_ns", "inode")}
        for name, entry in record["variants"].items()
    }
    sidecar.write_text(json.dumps(record))  # as a squeeze before the variants' stat wrote it
    hashed, _, _ = _count_variant_reads(monkeypatch)
    before = identities(out)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    assert sorted(hashed) == sorted(str(out / pattern.format(seed=0)) for pattern in VARIANT_FILES.values())
    stamped = json.loads(sidecar.read_text())
    assert stamped["variants"] == {
        name: {**entry, **stamps[name]} for name, entry in record["variants"].items()
    }
    changed = {name for name, identity in identities(out).items() if before[name] != identity}
    assert changed == {"run.json", "dog/000-s0.json"}  # no variant made again
    hashed.clear()
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    assert hashed == []


# What image files carry: output.metadata --------------------------------------------------------------


def local_model_record() -> dict:
    job = make_job()
    return make_record(job, model={"pipeline": "/home/me/weights/flux"}, preset="custom")


def test_metadata_full_embeds_the_record_and_the_local_model_folder() -> None:
    with Image.open(_png(local_model_record(), "full")) as image:
        assert json.loads(image.info[PNG_RECORD_KEY])["references"] == ["/data/dog/00.jpg"]
        assert "Model id: /home/me/weights/flux" in image.info[PNG_PARAMETERS_KEY]


def test_metadata_minimal_leaves_paths_out_of_the_image_and_none_leaves_everything_out() -> None:
    from sd_parsers import ParserManager

    record = local_model_record()
    with Image.open(_png(record, "minimal")) as image:
        assert PNG_RECORD_KEY not in image.info  # the references' paths
        parameters = image.info[PNG_PARAMETERS_KEY]
        assert "/home/me" not in parameters and "Seed: 7" in parameters
    assert ParserManager().parse(_png(record, "minimal")).samplers[0].parameters["seed"] == "7"
    with Image.open(_png(record, "none")) as image:
        assert PNG_RECORD_KEY not in image.info and PNG_PARAMETERS_KEY not in image.info
    for image_format in ("jpeg", "webp"):
        variant = OutputVariant(name="v", size="32x32", format=image_format)
        data = encode_variant(Image.new("RGB", (64, 64)), variant, record, "none")
        with Image.open(_bytes(data)) as image:
            assert not image.getexif().get_ifd(0x8769)  # no EXIF UserComment
            assert image.info["icc_profile"] == srgb_profile()  # colour is not generation metadata
        data = encode_variant(Image.new("RGB", (64, 64)), variant, record, "minimal")
        assert ParserManager().parse(_bytes(data)).samplers[0].parameters["seed"] == "7"
        assert b"/home/me" not in data


def test_gen_with_minimal_metadata_keeps_everything_in_the_sidecar(tmp_path, squeeze) -> None:
    shutil.copytree(Path(__file__).parents[1] / "examples" / "images", tmp_path / "images")
    result = squeeze("gen", str(write_manifest(tmp_path, metadata="minimal")), "--quiet")
    assert result.code == 0, result.err[-3000:]
    out = tmp_path / "out"
    sidecar = json.loads((out / "dog/000-s0.json").read_text())
    assert sidecar["references"] and sidecar["variants"]["amazon"]["spec"]["metadata"] == "minimal"
    with Image.open(out / "dog/000-s0.png") as image:
        assert PNG_RECORD_KEY not in image.info and PNG_PARAMETERS_KEY in image.info
    for pattern in VARIANT_FILES.values():
        data = (out / pattern.format(seed=0)).read_bytes()
        assert str(tmp_path).encode() not in data and str(tmp_path).encode("utf-16-be") not in data


# Fitting ----------------------------------------------------------------------------------------------


def test_pad_fills_with_the_background_crop_covers_contain_fits() -> None:
    tall = Image.new("RGB", (50, 100), (10, 20, 30))
    padded = fit_image(tall, OutputVariant(name="v", size="100x100", fit="pad", background="#ff0000"))
    assert padded.size == (100, 100)
    assert padded.getpixel((0, 50)) == (255, 0, 0) and padded.getpixel((50, 50)) == (10, 20, 30)
    cropped = fit_image(tall, OutputVariant(name="v", size="100x100", fit="crop"))
    assert cropped.size == (100, 100) and cropped.getpixel((0, 0)) == (10, 20, 30)
    assert fit_image(tall, OutputVariant(name="v", size="100x100", fit="contain")).size == (50, 100)


@pytest.mark.parametrize("fit", ["pad", "crop", "contain"])
def test_a_box_far_narrower_than_the_image_still_gives_an_image(fit: str) -> None:
    """`contain` of a 64x16 master in a 1x100 box rounded its height to 0 pixels: `gen` died with PIL's
    "cannot write empty image" traceback."""
    variant = OutputVariant(name="v", size="1x100", fit=fit, format="png")
    master = Image.new("RGB", (64, 16), (10, 20, 30))
    with Image.open(_bytes(encode_variant(master, variant, {}, "none"))) as written:
        assert written.size == ((1, 1) if fit == "contain" else (1, 100))


def test_the_srgb_profile_is_a_valid_icc_profile() -> None:
    profile = ImageCms.ImageCmsProfile(_bytes(srgb_profile()))
    assert "sRGB" in ImageCms.getProfileDescription(profile)
    # Not the time it was made: every process, every run embeds the same bytes.
    assert profile.profile.creation_date == datetime.datetime(2025, 1, 1)
    assert profile.profile.profile_id == b"\0" * 16


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("{name: a, size: 2000px}", "must be WIDTHxHEIGHT"),
        ("{name: a, size: 10x0}", "must be WIDTHxHEIGHT"),
        ("{name: a, size: 10x10, format: png, quality: 80}", "`quality` is for jpeg and webp"),
        ("{name: a, size: 10x10, background: blurple}", "'blurple' is not a colour"),
        ("{name: ../a, size: 10x10}", "not usable as a folder name"),
        ("{name: a, size: 10x10, fit: stretch}", "fit"),
    ],
)
def test_bad_variants_are_located_errors(variant: str, message: str, make_project, squeeze) -> None:
    text = MANIFEST.format(metadata="full", social_quality=80).replace(
        "    - {name: amazon, size: 96x96, fit: pad, format: jpeg}", f"    - {variant}"
    )
    project = make_project(m=text)
    result = squeeze("validate", str(project / "m.yaml"))
    assert result.code == 2
    assert "m.yaml:9:" in result.err and message in result.err


def test_variant_names_are_unique(make_project, squeeze) -> None:
    text = MANIFEST.format(metadata="full", social_quality=80).replace("name: social", "name: Amazon")
    result = squeeze("validate", str(make_project(m=text) / "m.yaml"))
    assert result.code == 2 and "variant name 'Amazon' appears more than once" in result.err


def _png(record: dict, metadata: str):
    return _bytes(encode_png(Image.new("RGB", (16, 16)), record, metadata))  # type: ignore[arg-type]


def _bytes(data: bytes):
    import io

    return io.BytesIO(data)


# Stale images, killed runs and the tree ---------------------------------------------------------------


def fresh_project(tmp_path: Path) -> Path:
    shutil.copytree(Path(__file__).parents[1] / "examples" / "images", tmp_path / "images")
    return write_manifest(tmp_path)


def test_a_stale_image_moves_to_stale_with_its_variants(tmp_path: Path, squeeze) -> None:
    manifest = fresh_project(tmp_path)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    old = json.loads((tmp_path / "out/dog/000-s0.json").read_text())
    manifest.write_text(manifest.read_text().replace("on a rug", "on a sofa"))  # new job ids, same names
    result = squeeze("gen", str(manifest), "--quiet")
    assert result.code == 0, result.err[-3000:]
    (stale,) = (tmp_path / "out/.stale").iterdir()
    for pattern in VARIANT_FILES.values():
        assert (stale / pattern.format(seed=0)).is_file()  # moved, under the same name
    assert json.loads((stale / "dog/000-s0.json").read_text())["job_id"] == old["job_id"]
    new = json.loads((tmp_path / "out/dog/000-s0.json").read_text())
    assert new["prompt"] == "a dog on a sofa" and set(new["variants"]) == set(VARIANT_FILES)
    assert (tmp_path / "out" / VARIANT_FILES["amazon"].format(seed=0)).is_file()


def test_a_killed_runs_temporary_variant_files_are_removed(tmp_path: Path, squeeze) -> None:
    manifest = fresh_project(tmp_path)
    leftover = tmp_path / "out/dog/variants/amazon/.000-s0.jpg.999999999.tmp"  # no such process
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a jpeg")
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    assert not leftover.exists()


def test_a_link_in_place_of_a_variants_folder_is_refused_before_loading(tmp_path: Path, squeeze) -> None:
    manifest = fresh_project(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out/dog/variants").mkdir(parents=True)
    (tmp_path / "out/dog/variants/amazon").symlink_to(tmp_path / "elsewhere")
    result = squeeze("gen", str(manifest), "--quiet")
    assert result.code == 2
    assert result.err.startswith(f"error: {tmp_path / 'out/dog/variants/amazon'} is a symbolic link")
    assert not (tmp_path / "out/dog/000-s0.png").exists() and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_stale_image_takes_only_the_variants_under_its_own_name(tmp_path: Path) -> None:
    from squeeze_cli.outputs.stale import find_stale

    (tmp_path / "dog").mkdir()
    files = {
        "amazon": "dog/variants/amazon/000-s0.jpg",  # its own
        "moved": "dog/variants/moved/001-s0.jpg",  # made under an older name: another image's now
        "..": "dog/variants/../000-s0.jpg",  # a damaged sidecar
        "far": "../../000-s0.jpg",
    }
    sidecar = {"job_id": "f" * 16, "variants": {name: {"file": file} for name, file in files.items()}}
    (tmp_path / "dog/000-s0.json").write_text(json.dumps(sidecar))
    (stale,) = find_stale(tmp_path, [])
    assert stale.variants == ("dog/variants/amazon/000-s0.jpg",)


def test_variants_move_with_their_image_when_its_prompt_moves(tmp_path: Path, squeeze, monkeypatch) -> None:
    manifest = fresh_project(tmp_path)
    assert squeeze("gen", str(manifest), "--quiet").code == 0
    out = tmp_path / "out"
    made = {name: _identity(out / pattern.format(seed=0)) for name, pattern in VARIANT_FILES.items()}
    # A new first prompt: the old prompt's images move from 000-s* to 001-s*, and keep their variants.
    manifest.write_text(manifest.read_text().replace('prompts: ["a', 'prompts: ["a {class} in a box", "a'))
    hashed, sidecars, _ = _count_variant_reads(monkeypatch)
    result = squeeze("gen", str(manifest), "--quiet")
    assert result.code == 0, result.err[-3000:]
    # The moved variants keep their stamps under the new names: only the new images' sidecars are read.
    assert hashed == [] and sorted(sidecars) == [str(out / f"dog/000-s{seed}.json") for seed in (0, 1)]
    sidecar = json.loads((out / "dog/001-s0.json").read_text())
    assert sidecar["prompt"] == "a dog on a rug"
    index = {line["image"]: line for line in map(json.loads, (out / "index.jsonl").read_text().splitlines())}
    for name, pattern in VARIANT_FILES.items():
        moved = pattern.format(seed=0).replace("/000-", "/001-")
        assert _identity(out / moved) == made[name]  # renamed, not made again
        assert sidecar["variants"][name]["file"] == moved == index["dog/001-s0.png"]["variants"][name]
        # The new prompt's image has its own variant at the old name.
        assert json.loads((out / "dog/000-s0.json").read_text())["variants"][name]["file"] == pattern.format(
            seed=0
        )


# Two subjects, three prompts: enough for each of two processes to get a share of the variants.
TWO_SUBJECTS = """\
version: 1
recipe: tiny
output:
  grids: false
  contact_sheet: false
  variants:
    - {name: amazon, size: 96x96, fit: pad, format: jpeg}
    - {name: thumb, size: 40x20, fit: contain, format: png}
defaults: {height: 32, width: 48, num_inference_steps: 2, reference_size: 32, seeds: [0, 1]}
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts: ["a {class} in the snow", "a {class} on the beach"]
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts: ["a {class} on a table"]
"""


def test_the_finished_images_are_cut_between_the_processes_as_the_plan_is(make_project, plan_of) -> None:
    jobs = plan_of(make_project(m=TWO_SUBJECTS) / "m.yaml")
    finished = {job.job_id: Finished(f"stem-{i}", "0" * 64, {}) for i, job in enumerate(jobs) if i != 1}
    shares = variant_shares(jobs, finished, 2)
    assert all(shares), "both processes get work"
    assert [job_id for share in shares for job_id in share] == list(finished)  # plan order, once each
    assert all(share[job_id] is finished[job_id] for share in shares for job_id in share)
    done = [job for job in jobs if job.job_id in finished]
    assert [list(share) for share in shares] == [[j.job_id for j in shard_jobs(done, i, 2)] for i in (0, 1)]
    assert variant_shares(jobs, finished, 1) == [finished]


def _sidecars(out: Path) -> dict[str, dict]:
    """Each sidecar, without the stat of its files (another copy: another inode and time)."""
    records = {}
    for path in sorted(out.glob("*/[0-9]*-s*.json")):
        record = json.loads(path.read_text())
        for facts in [record[PNG_FILE_KEY], *record.get("variants", {}).values()]:
            del facts["mtime_ns"], facts["inode"]
        records[str(path.relative_to(out))] = record
    return records


@pytest.mark.slow
def test_two_processes_share_the_variants_and_make_the_files_one_process_makes(make_project, squeeze) -> None:
    project = make_project(m=TWO_SUBJECTS)
    two, one = project / "two", project / "one"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = two_processes("gen", str(project / "m.yaml"), "--out", str(two), "--quiet")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((two / "run.json").read_text())
    assert summary["status"] == "completed" and summary["processes"] == 2
    # 6 images, 2 variants each, made by both processes.
    assert summary["variants"]["made"] == 12 and all(summary["variants"]["by_process"]), summary["variants"]

    # The same images and sidecars without their variants, made again by one process: the same files.
    shutil.copytree(two, one, ignore=shutil.ignore_patterns("variants"))
    for path in one.glob("*/[0-9]*-s*.json"):
        record = json.loads(path.read_text())
        del record["variants"]
        path.write_text(json.dumps(record))
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(one), "--quiet")
    assert result.code == 0, result.err[-3000:]
    assert json.loads((one / "run.json").read_text())["variants"] == {"made": 12, "by_process": [12]}
    files = {str(path.relative_to(two)): path.read_bytes() for path in sorted(two.glob("*/variants/*/*"))}
    assert len(files) == 12
    assert files == {str(p.relative_to(one)): p.read_bytes() for p in sorted(one.glob("*/variants/*/*"))}
    sidecars = _sidecars(two)
    assert sidecars == _sidecars(one) and len(sidecars) == 6
    # Each index line names its image's variants, as its sidecar records them (also where the images were
    # all finished before the run).
    for out in (two, one):
        index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
        assert len(index) == 6
        for line in index:
            recorded = sidecars[line["sidecar"]]["variants"]
            assert line["variants"] == {name: facts["file"] for name, facts in recorded.items()}, out


# Loaded by every Python of the launch through PYTHONPATH: process 1 cannot write a variant (a full disk).
FULL_DISK_ON_PROCESS_1 = """
import errno, os
from pathlib import Path

if os.environ.get("RANK") == "1":
    from squeeze_cli.outputs import files, variants

    def _full(path, data):
        full = OSError(errno.ENOSPC, "No space left on device")
        raise files.OutputWriteError.from_os_error(Path(path), full)

    variants.atomic_write_bytes = _full
"""


@pytest.mark.slow
def test_a_process_that_cannot_write_a_variant_fails_the_run_and_leaves_none_waiting(
    make_project, plan_of
) -> None:
    project = make_project(m=TWO_SUBJECTS)
    hook, out = project / "hook", project / "out"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK_ON_PROCESS_1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(hook)}
    command = two_processes("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0
    assert "No space left on device" in result.stderr, result.stderr[-3000:]
    # Process 0 made its share and says so; process 1 made none; every image is kept.
    jobs = plan_of(project / "m.yaml")
    first, second = variant_shares(jobs, {job.job_id: Finished("", "", {}) for job in jobs}, 2)
    stems = {f"{job.subject}/{image_stem(job)}" for job in jobs if job.job_id in first}
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert summary["variants"] == {"made": 2 * len(first), "by_process": [2 * len(first), 0]}
    made = {f"{path.parts[-4]}/{path.stem}" for path in out.glob("*/variants/*/*")}
    assert made == stems and len(list(out.glob("*/variants/*/*"))) == 2 * len(first)
    assert len(list(out.glob("*/[0-9]*-s*.png"))) == len(jobs) and second
