"""Declarative jobs: job files validated before anything runs, many scenes on one cluster,
finished scenes reused, changed parameters refused without --overwrite, layered settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from geoseg.cli.main import cli
from geoseg.errors import ConfigError, InputError, InputNotFoundError, OutputExistsError
from geoseg.jobs import load_job, plan, validate_spec

from conftest import blob_scene, write_raster

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))
NO_ENV: dict[str, str] = {}


def write_job(path: Path, **settings) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(map(str, args)))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A folder with one 4-band scene (data/field.tif) and one scene as four single-band files."""
    root = tmp_path_factory.mktemp("job")
    image, _ = blob_scene(160, 200, 4, seed=7)
    image[:, :8, :8] = 0
    (root / "data").mkdir()
    write_raster(root / "data" / "field.tif", image, nodata=0)
    bands = root / "LC08_044034_20230715"
    bands.mkdir()
    other, _ = blob_scene(160, 200, 4, seed=8)
    for i in range(4):
        write_raster(bands / f"SR_B{i + 2}.tif", other[i], nodata=0)
    return root


def job_settings(model: Path, **extra) -> dict:
    return {
        "scenes": ["data/*.tif", {"name": "landsat", "bands": [f"LC08_044034_20230715/SR_B{i}.tif" for i in (2, 3, 4, 5)]}],
        "model": str(model),
        "output": "out",
        "chunking": {"chunk_size": 128, "halo": 16},
        **extra,
    }


# -- validation -------------------------------------------------------------------------------

def test_missing_field_names_the_file_and_says_what_to_add(tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], output="out")
    with pytest.raises(ConfigError) as exc:
        validate_spec(job, env=NO_ENV, config_files=[])
    msg = str(exc.value)
    assert msg.startswith(str(job)) and "model: missing" in msg and "model directory" in msg


def test_unknown_and_bad_fields_are_all_reported(tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o",
                    chunking={"chunksize": 512, "precision": "fp16", "batch_size": 0})
    with pytest.raises(ConfigError) as exc:
        validate_spec(job, env=NO_ENV, config_files=[])
    msg = str(exc.value)
    assert "3 problems" in msg
    assert "chunking.chunksize: unknown setting; did you mean chunk_size?" in msg
    assert "chunking.precision" in msg and "auto, fp32 or bf16" in msg
    assert "chunking.batch_size" in msg and "greater than 0" in msg


def test_inference_settings_reach_the_predict_options(tmp_path):
    """A job's TTA and post-processing in place of the card's, as geoseg predict takes them; a bad mmu says what to give."""
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", inference={"tta": "none", "mmu": "2=40,3=12"})
    opts = validate_spec(job, env=NO_ENV, config_files=[]).predict_options()
    assert opts.tta == "none" and opts.postprocess.class_min_pixels == {2: 40, 3: 12} and opts.postprocess.majority_radius == 0
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", inference={"majority": 0})
    opts = validate_spec(job, env=NO_ENV, config_files=[]).predict_options()
    assert opts.postprocess is not None and not opts.postprocess.active  # none in place of the card's
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o")
    opts = validate_spec(job, env=NO_ENV, config_files=[]).predict_options()
    assert opts.tta is None and opts.postprocess is None  # the card's
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", inference={"mmu": "2=4,2=40"})
    with pytest.raises(ConfigError, match=r"inference\.mmu: .*given more than once"):
        validate_spec(job, env=NO_ENV, config_files=[])
    with pytest.raises(ConfigError, match=r"inference\.mmu: .*\(set by DASK_GEOSEG__INFERENCE__MMU\)"):
        validate_spec(job, env={"DASK_GEOSEG__INFERENCE__MMU": "lots"}, config_files=[])


def test_bad_value_from_the_environment_names_the_variable(tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o")
    with pytest.raises(ConfigError, match=r"chunking\.chunk_size: .*\(set by DASK_GEOSEG__CHUNKING__CHUNK_SIZE\)"):
        validate_spec(job, env={"DASK_GEOSEG__CHUNKING__CHUNK_SIZE": "-5"}, config_files=[])


def test_words_and_names_from_the_environment_keep_their_text(tmp_path):
    """dask's parser read TTA none as None (refused as "should be 'card', 'none' or 'd4'") and a job named 2024 as a number."""
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o")
    spec = validate_spec(job, env={"DASK_GEOSEG__INFERENCE__TTA": "none", "DASK_GEOSEG__NAME": "2024",
                                   "DASK_GEOSEG__CHUNKING__CHUNK_SIZE": "512"}, config_files=[])
    assert spec.predict_options().tta == "none" and spec.name == "2024" and spec.chunking.chunk_size == 512
    from geoseg.jobs.config import cli_layer

    assert cli_layer(settings=["name=2024", "inference.tta=none"]).data == {"name": "2024", "inference": {"tta": "none"}}
    # YAML 1.2 scalars: a walltime is no base-60 number (PyYAML's 1.1 read 12:00:00 as 43200), yes is a word
    from geoseg.jobs.config import parse_value

    assert [parse_value("v", r) for r in ("12:00:00", "yes", "1e3", "0755", "null", "[a, b]", "{GPU: 1}", "tcp://h:8786",
                                          "2024-01-01")] == [
        "12:00:00", "yes", 1000.0, 755, None, ["a", "b"], {"GPU": 1}, "tcp://h:8786", "2024-01-01"]
    job = write_job(tmp_path / "slurm.yaml", scenes=["a.tif"], model="m", output="o",
                    cluster={"profile": "hpc", "profiles": {"hpc": {"kind": "slurm"}}})
    spec = validate_spec(job, env={"DASK_GEOSEG__CLUSTER__PROFILES__HPC__WALLTIME": "12:00:00"}, config_files=[])
    assert spec.profile.walltime == "12:00:00"
    # the job file itself reads alike (it was YAML 1.1: the walltime 43200, refused, and a job named 2024 too)
    (tmp_path / "written.yaml").write_text("name: 2024\nscenes: [{name: 007, path: a.tif}]\nmodel: m\noutput: o\n"
                                           "cluster: {profile: hpc, profiles: {hpc: {kind: slurm, walltime: 12:00:00}}}\n")
    spec = validate_spec(tmp_path / "written.yaml", env={}, config_files=[])
    assert spec.profile.walltime == "12:00:00" and spec.name == "2024" and spec.scenes[0].name == "007"


def test_typos_in_every_section_get_a_hint(tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", inference={"majorty": 1},
                    objects={"score_treshold": 0.5})
    with pytest.raises(ConfigError) as exc:
        validate_spec(job, env=NO_ENV, config_files=[])
    assert "did you mean majority?" in str(exc.value) and "did you mean score_threshold?" in str(exc.value)


def test_unknown_profile_lists_the_known_ones(tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", cluster={"profile": "gpus"})
    with pytest.raises(ConfigError) as exc:
        validate_spec(job, env=NO_ENV, config_files=[])
    assert str(exc.value).startswith(str(job))
    assert "unknown profile 'gpus'" in str(exc.value) and "kubernetes, local" in str(exc.value)
    code, out = invoke("run", job, "--profile", "hpc")
    assert code == 2 and "unknown profile 'hpc'" in out and "(set by the command line)" in out


def test_profile_kind_and_tls_are_checked(tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o",
                    cluster={"profile": "x", "profiles": {"x": {"kind": "yarn"}}})
    with pytest.raises(ConfigError, match=r"cluster\.profiles\.x: kind 'yarn' is no cluster profile kind"):
        validate_spec(job, env=NO_ENV, config_files=[])
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o",
                    cluster={"profile": "x", "profiles": {"x": {"kind": "address", "address": "tls://h:8786"}}})
    with pytest.raises(ConfigError, match=r"cluster\.profiles\.x: .*TLS address; add tls:"):
        validate_spec(job, env=NO_ENV, config_files=[])
    # the packaged profile "local" given another kind is replaced whole: its local settings were merged in and
    # refused ("n_workers: unknown setting; did you mean n_workers?")
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o",
                    cluster={"profile": "local", "profiles": {"local": {"kind": "slurm", "cores": 4, "memory": "8GiB"}}})
    spec = validate_spec(job, env=NO_ENV, config_files=[])
    assert spec.profile.kind == "slurm" and spec.profile.cores == 4
    # the same kind still merges key by key
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o",
                    cluster={"profile": "local", "profiles": {"local": {"kind": "local", "n_workers": 3}}})
    spec = validate_spec(job, env=NO_ENV, config_files=[])
    assert spec.profile.n_workers == 3 and spec.profile.threads_per_worker is not None


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenes: [a.tif\nmodel: m\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+: not valid YAML"):
        validate_spec(bad)
    bad.write_text("- a.tif\n")
    with pytest.raises(ConfigError, match="a job file is a mapping"):
        validate_spec(bad)
    with pytest.raises(ConfigError, match="no such job file"):
        validate_spec(tmp_path / "missing.yaml")


def test_settings_that_would_be_taken_otherwise_than_written_are_refused(tmp_path):
    """A key given twice (YAML keeps the last without a word), both spellings of one key, true for a number
    (pydantic's lax mode made it 1) and a timeout that is no duration (a traceback when the job ran)."""
    job = tmp_path / "dup.yaml"
    job.write_text("scenes: [a.tif]\nmodel: m\noutput: o\nchunking:\n  chunk_size: 512\n  halo: 16\n  chunk_size: 4096\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 7: .*'chunk_size' is given twice in one mapping \(lines 5 and 7\)"):
        validate_spec(job, env=NO_ENV, config_files=[])
    for chunking, match in (({"chunk-size": 512, "chunk_size": 1024}, r"chunking\.chunk_size is given twice \(as chunk-size and chunk_size\)"),
                            ({"chunk_size": True}, r"chunking.*chunk_size: true is a yes/no value")):
        job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", chunking=chunking)
        with pytest.raises(ConfigError, match=match):
            validate_spec(job, env=NO_ENV, config_files=[])
    for timeout in ("soon", "-5s", 0):
        job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", cluster={
            "profile": "x", "profiles": {"x": {"kind": "address", "address": "tcp://h:8786", "timeout": timeout}}})
        with pytest.raises(ConfigError, match=r"cluster\.profiles\.x\.timeout: .*(no duration|longer than 0)"):
            validate_spec(job, env=NO_ENV, config_files=[])
    ok = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", outputs={"cog": False}, cluster={
        "profile": "x", "profiles": {"x": {"kind": "address", "address": "tcp://h:8786", "timeout": "2 minutes"}}})
    spec = validate_spec(ok, env=NO_ENV, config_files=[])
    assert spec.outputs.cog is False and spec.predict_options().worker_timeout == 120.0


def test_yaml_merge_keys_are_read_as_yaml_reads_them(tmp_path):
    """Anchors with merge keys (``<<: *base``, a common way to share a profile's settings) were refused as "not
    valid YAML" (the duplicate-key check built the merge key itself); the mapping's own keys override the merged
    ones, and a key given twice in the mapping itself is still refused."""
    job = tmp_path / "merge.yaml"
    job.write_text(
        "scenes: [a.tif]\nmodel: m\noutput: o\n"
        "cluster:\n  profile: big\n  profiles:\n"
        "    base: &base {kind: address, address: 'tcp://h:8786', timeout: 1 minute}\n"
        "    big:\n      <<: *base\n      timeout: 2 minutes\n")
    spec = validate_spec(job, env=NO_ENV, config_files=[])
    assert spec.predict_options().worker_timeout == 120.0
    assert yaml.safe_load(job.read_text())["cluster"]["profiles"]["big"]["timeout"] == "2 minutes"
    job.write_text(job.read_text() + "      timeout: 3 minutes\n")
    with pytest.raises(ConfigError, match=r"'timeout' is given twice in one mapping"):
        validate_spec(job, env=NO_ENV, config_files=[])


def test_scene_entries_are_checked(tmp_path):
    job = write_job(tmp_path / "job.yaml", scenes=[{"name": "a", "path": "x.tif", "bands": ["y.tif"]}, 5, {"name": "../up", "path": "z.tif"}],
                    model="m", output="o")
    with pytest.raises(ConfigError) as exc:
        validate_spec(job, env=NO_ENV, config_files=[])
    msg = str(exc.value)
    assert "scenes[0]: give either path: (a raster or a glob) or bands: (a list of single-band files), not both" in msg
    assert "scenes[1]: 5 is no scene" in msg and "scenes[2].name: '../up' cannot be used; a scene name is one folder name" in msg


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_pipeline_validates(path):
    spec = validate_spec(path, env=NO_ENV, config_files=[])
    assert spec.scenes and spec.model and spec.output
    assert spec.profile.kind in ("local", "address", "slurm", "kubernetes")
    # Relative paths start at the pipeline's folder, wherever geoseg runs from.
    for p in (spec.model, spec.output):
        assert Path(p).is_absolute()


def test_pipelines_cover_the_documented_cases():
    specs = {p.stem: validate_spec(p, env=NO_ENV, config_files=[]) for p in PIPELINES}
    assert {"sample_local", "landsat_bands", "slurm_gpu", "address_tls"} <= set(specs)
    root = PIPELINES[0].parent.parent
    sample = specs["sample_local"]
    assert sample.profile.kind == "local"
    assert Path(sample.scenes[0].path) == root / "demo" / "data" / "image.tif"  # what `geoseg sample-data demo/data` writes
    assert Path(sample.model) == root / "demo" / "model"
    assert any(s.bands and len(s.bands) == 4 for s in specs["landsat_bands"].scenes)
    gpu = specs["slurm_gpu"]
    assert gpu.profile.kind == "slurm" and gpu.profile.model_resources == {"GPU": 1}
    assert gpu.predict_options().model_resources == {"GPU": 1}
    panoptic = specs["buildings_panoptic"]
    opts = panoptic.predict_options()
    assert Path(opts.instance_model) == root / "models" / "buildings" and opts.max_object_size == "60m"
    assert opts.score_threshold == 0.5 and opts.chunk_size == 1024
    tls = specs["address_tls"].profile
    assert tls.kind == "address" and tls.address.startswith("tls://") and tls.tls is not None


# -- scenes -----------------------------------------------------------------------------------

def test_scenes_globs_band_lists_and_names(scenes, random_model, monkeypatch, tmp_path):
    job = write_job(scenes / "names.yaml", **job_settings(random_model))
    monkeypatch.chdir(tmp_path)  # relative paths start at the job file, not here
    spec = load_job(job, env=NO_ENV, config_files=[])
    found = spec.expand_scenes()
    assert [s.name for s in found] == ["field", "landsat"]
    assert found[0].inputs == (str(scenes / "data" / "field.tif"),)
    assert [Path(p).name for p in found[1].inputs] == ["SR_B2.tif", "SR_B3.tif", "SR_B4.tif", "SR_B5.tif"]
    assert found[1].out_dir == scenes / "out" / "landsat"
    # A band list without a name is named after its folder; band entries may be one-file globs.
    job = write_job(scenes / "names.yaml", **job_settings(random_model, scenes=[[f"LC08_*/SR_B{i}.tif" for i in (2, 3, 4, 5)]]))
    assert [s.name for s in load_job(job, env=NO_ENV, config_files=[]).expand_scenes()] == ["LC08_044034_20230715"]


def test_glob_without_match_names_the_job_file(scenes, random_model):
    job = write_job(scenes / "nomatch.yaml", **job_settings(random_model, scenes=["data/*.tiff"]))
    with pytest.raises(InputNotFoundError) as exc:
        load_job(job, check_inputs=True, env=NO_ENV, config_files=[])
    assert str(exc.value).startswith(f"{job}: scenes[0]:") and "*.tiff matches no file" in str(exc.value)
    assert not (scenes / "out").exists()


def test_scene_name_clashes_and_ambiguous_bands(scenes, random_model):
    job = write_job(scenes / "clash.yaml", **job_settings(random_model, scenes=["data/field.tif", {"path": "data/*.tif"}]))
    with pytest.raises(ConfigError, match="two scenes are named 'field' and 'field'"):
        load_job(job, check_inputs=True, env=NO_ENV, config_files=[])
    # names that differ only in case are one folder on case-insensitive file systems (macOS, Windows, SMB)
    job = write_job(scenes / "clash.yaml", **job_settings(random_model, scenes=[
        {"name": "Tile", "path": "data/field.tif"}, {"name": "tile", "path": "data/field.tif"}]))
    with pytest.raises(ConfigError, match="two scenes are named 'Tile' and 'tile'.*ignoring case"):
        load_job(job, check_inputs=True, env=NO_ENV, config_files=[])
    job = write_job(scenes / "clash.yaml", **job_settings(random_model, scenes=[{"name": "x", "bands": ["LC08_*/SR_B*.tif"]}]))
    with pytest.raises(ConfigError, match=r"band LC08_\*/SR_B\*\.tif matches 4 files"):
        load_job(job, check_inputs=True, env=NO_ENV, config_files=[])


def test_a_scene_cannot_take_the_name_of_the_job_s_summary(scenes, random_model):
    job = write_job(scenes / "reserved.yaml", **job_settings(random_model, scenes=[{"name": "job.json", "path": "data/field.tif"}]))
    with pytest.raises(ConfigError, match=r"a scene named 'job.json' .* would take the name of the job's own job.json"):
        load_job(job, check_inputs=True, env=NO_ENV, config_files=[])


def test_earlier_outputs_are_never_inputs(scenes, random_model, tmp_path):
    folder = tmp_path / "tiles"
    (folder / "out" / "a").mkdir(parents=True)
    write_raster(folder / "a.tif", blob_scene(32, 32, 4, seed=2)[0])
    write_raster(folder / "out" / "a" / "classes.tif", np.zeros((1, 32, 32), np.uint8))
    job = write_job(folder / "job.yaml", scenes=["**/*.tif"], model=str(random_model), output="out")
    assert [s.name for s in load_job(job, env=NO_ENV, config_files=[]).expand_scenes()] == ["a"]
    # a pattern whose only files lie in the output folder says so (not "matches no file")
    job = write_job(folder / "job.yaml", scenes=["out/**/*.tif"], model=str(random_model), output="out")
    with pytest.raises(InputNotFoundError, match=r"the 1 file\(s\) out/\*\*/\*\.tif matches lie in the job's output folder"):
        load_job(job, env=NO_ENV, config_files=[]).expand_scenes()


def test_every_scene_is_checked_before_anything_runs(scenes, random_model, tmp_path, monkeypatch):
    three = tmp_path / "three.tif"
    write_raster(three, blob_scene(64, 64, 3, seed=1)[0])
    job = write_job(scenes / "bad.yaml", **job_settings(random_model, scenes=["data/field.tif", str(three), "missing.tif"]))
    with pytest.raises(InputError) as exc:
        load_job(job, check_inputs=True, env=NO_ENV, config_files=[])
    msg = str(exc.value)
    assert msg.startswith(str(job)) and "missing.tif: no such file" in msg
    # a path out of the job's folder, run from elsewhere: said whole (it was shown relative to the current folder,
    # beside a hint that relative paths start at the job file's folder)
    (scenes / "sub").mkdir(exist_ok=True)
    job = write_job(scenes / "sub" / "up.yaml", **job_settings(random_model, scenes=["../data/gone.tif"]))
    monkeypatch.chdir(scenes)
    with pytest.raises(InputError, match=f"{scenes / 'data' / 'gone.tif'}: no such file"):
        load_job(job, check_inputs=True, env=NO_ENV, config_files=[])
    monkeypatch.undo()
    job = write_job(scenes / "bad.yaml", **job_settings(random_model, scenes=["data/field.tif", str(three)]))
    with pytest.raises(InputError, match=r"scene three: .*3 band\(s\) given but .* expects 4"):
        load_job(job, check_inputs=True, env=NO_ENV, config_files=[])
    assert not (scenes / "out").exists()


# -- layered settings -------------------------------------------------------------------------

def test_settings_layers_default_job_env_cli(tmp_path):
    """packaged default < job file < DASK_GEOSEG__... < --set/--profile."""
    profiles = {name: {"kind": "local", "n_workers": 1} for name in ("from_job", "from_env", "from_cli")}
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o")
    spec = validate_spec(job, env=NO_ENV, config_files=[])
    assert spec.chunking.chunk_size is None and spec.cluster.profile == "local" and spec.chunking.precision == "auto"

    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o",
                    chunking={"chunk_size": 256, "precision": "bf16"}, cluster={"profile": "from_job", "profiles": profiles})
    spec = validate_spec(job, env=NO_ENV, config_files=[])
    assert (spec.chunking.chunk_size, spec.cluster.profile, spec.chunking.precision) == (256, "from_job", "bf16")

    env = {"DASK_GEOSEG__CHUNKING__CHUNK_SIZE": "512", "DASK_GEOSEG__CLUSTER__PROFILE": "from_env"}
    spec = validate_spec(job, env=env, config_files=[])
    assert (spec.chunking.chunk_size, spec.cluster.profile, spec.chunking.precision) == (512, "from_env", "bf16")

    spec = validate_spec(job, env=env, config_files=[], settings=["chunking.chunk_size=1024"], profile="from_cli")
    assert (spec.chunking.chunk_size, spec.cluster.profile, spec.chunking.precision) == (1024, "from_cli", "bf16")
    # The packaged local profile merges with a job's partial one.
    assert spec.cluster.profiles["local"].threads_per_worker == 1


def test_dask_config_files_sit_between_defaults_and_job(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "geoseg.yaml").write_text(yaml.safe_dump({"geoseg": {"chunking": {"batch_size": 6, "halo": 8}, "cluster": {
        "profiles": {"hpc": {"kind": "slurm", "cores": 4, "memory": "8GiB"}}}}}))
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o", chunking={"halo": 32},
                    cluster={"profile": "hpc"})
    spec = validate_spec(job, env=NO_ENV, config_files=[str(site)])
    assert spec.chunking.batch_size == 6 and spec.chunking.halo == 32 and spec.profile.kind == "slurm"


def test_environment_is_read_by_the_cli(tmp_path, monkeypatch):
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model="m", output="o")
    monkeypatch.setenv("DASK_GEOSEG__CHUNKING__BATCH_SIZE", "0")
    code, out = invoke("run", job, "--dry-run")
    assert code == 2 and "chunking.batch_size" in out and "DASK_GEOSEG__CHUNKING__BATCH_SIZE" in out


# -- a real job -------------------------------------------------------------------------------

def test_run_two_scenes_then_nothing_then_overwrite(client, scenes, random_model, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    for p in scenes.iterdir():
        if p.is_dir() and p.name != "out":
            (root / p.name).symlink_to(p)
    job = write_job(root / "pipeline.yaml", **job_settings(random_model, name="two"))
    address = client.scheduler.address

    # Dry run: settings and plan printed, nothing written.
    code, out = invoke("run", job, "--scheduler", address, "--dry-run")
    assert code == 0, out
    assert "chunk_size: 128" in out and "field: compute (not run yet)" in out and "landsat: compute" in out
    assert not (root / "out").exists()

    code, out = invoke("run", job, "--scheduler", address)
    assert code == 0, out
    summary = json.loads((root / "out" / "job.json").read_text())
    assert summary["status"] == "finished" and summary["job"] == "two"
    assert [(s["name"], s["status"]) for s in summary["scenes"]] == [("field", "computed"), ("landsat", "computed")]
    assert summary["totals"] == {"scenes": 2, "computed": 2, "reused": 0, "skipped": 0, "failed": 0}
    assert summary["cluster"]["scheduler"] == address
    for s in summary["scenes"]:
        out_dir = root / "out" / s["name"]
        assert Path(s["out_dir"]) == out_dir
        assert sorted(p.name for p in out_dir.iterdir()) == ["classes.qml", "classes.tif", "item.json", "landuse.gpkg", "prediction.zarr", "run.json"]
        run = json.loads((out_dir / "run.json").read_text())
        assert run["job_key"] == s["job_key"] and s["chunks"]["computed"] == 4 and s["timings"]["segment_s"] > 0
    landsat_run = json.loads((root / "out" / "landsat" / "run.json").read_text())
    assert [b["file"].rsplit("/", 1)[1] for b in landsat_run["bands"]] == ["SR_B2.tif", "SR_B3.tif", "SR_B4.tif", "SR_B5.tif"]
    assert "field" in out and "computed" in out and "summary written to" in out

    # Again: nothing to do, no cluster contacted, nothing touched.
    stamps = {p: p.stat().st_mtime_ns for p in (root / "out").rglob("*.json")}
    code, out = invoke("run", job, "--scheduler", "tcp://127.0.0.1:9")  # unreachable: it must not be needed
    assert code == 0, out
    assert "nothing to do: all 2 scenes" in out and "reused" in out
    assert {p: p.stat().st_mtime_ns for p in (root / "out").rglob("*.json")} == stamps

    # A changed parameter: refused, naming both scenes and the way out.
    code, out = invoke("run", job, "--scheduler", address, "--set", "chunking.halo=24")
    assert code == 2
    assert "2 of 2 scenes cannot run" in out and "different model, input or parameters" in out and "--overwrite" in out
    assert {p: p.stat().st_mtime_ns for p in (root / "out").rglob("*.json")} == stamps

    code, out = invoke("run", job, "--scheduler", address, "--set", "chunking.halo=24", "--overwrite")
    assert code == 0, out
    again = json.loads((root / "out" / "job.json").read_text())
    assert [s["status"] for s in again["scenes"]] == ["computed", "computed"]
    for old, new in zip(summary["scenes"], again["scenes"]):
        assert new["job_key"] != old["job_key"]
        assert json.loads((Path(new["out_dir"]) / "run.json").read_text())["parameters"]["halo"] == 24

    # The library view of the same state: both scenes finished with the new settings.
    spec = load_job(job, env=NO_ENV, config_files=[], settings=["chunking.halo=24"])
    assert [sp.action for sp in plan(spec).scenes] == ["reuse", "reuse"]
    # A scene finished without an output the job asks for is not finished for this job.
    run_json = root / "out" / "field" / "run.json"
    record = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**record, "outputs": [o for o in record["outputs"] if o != "landuse.gpkg"]}))
    with pytest.raises(OutputExistsError, match=r"scene field: .*finished without landuse.gpkg, which the job now asks for"):
        plan(spec)
    assert [sp.action for sp in plan(spec, resume=True).scenes] == ["compute", "reuse"]
    (root / "out" / "field" / "landuse.gpkg").unlink()
    # --resume makes the missing output from the finished store's chunks (same job key): none is computed again
    code, out = invoke("run", job, "--scheduler", address, "--set", "chunking.halo=24", "--resume")
    assert code == 0, out
    redone = json.loads(run_json.read_text())
    assert redone["chunks"]["computed"] == 0 and redone["chunks"]["reused"] == redone["chunks"]["chunks"] > 0
    assert "landuse.gpkg" in redone["outputs"] and (root / "out" / "field" / "landuse.gpkg").is_file()


def test_a_failing_scene_is_recorded_and_the_rest_skipped(client, scenes, random_model, tmp_path):
    from geoseg.jobs import execute

    for name in ("a", "b"):
        shutil.copy(scenes / "data" / "field.tif", tmp_path / f"{name}.tif")
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif", "b.tif"], model=str(random_model), output="out",
                    chunking={"chunk_size": 256}, outputs={"cog": False, "vectors": False}, scenes_in_flight=1)
    jp = plan(load_job(job, env=NO_ENV, config_files=[]))
    (tmp_path / "a.tif").unlink()  # gone after the checks: the workers cannot read it
    # (Exception, not InputError: distributed cannot unpickle rasterio's error kept in the InputError's
    # __context__ and sends a plain Exception; the message survives.)
    with pytest.raises(Exception, match=r"a\.tif: read failed") as err:
        execute(jp, client=client)
    # it says which scene it was: the CLI's line starts "scene a:" (a worker killed by a task, for one, names no file)
    from geoseg.cli.main import _scene_of

    assert _scene_of(err.value) == "scene a: " and "(while running scene a)" in getattr(err.value, "__notes__", [])
    assert _scene_of(ValueError("not a scene's")) == ""
    summary = json.loads((tmp_path / "out" / "job.json").read_text())
    assert summary["status"] == "failed"
    assert [(s["name"], s["status"]) for s in summary["scenes"]] == [("a", "failed"), ("b", "skipped")]
    assert "a.tif" in summary["scenes"][0]["error"] and not (tmp_path / "out" / "a" / "run.json").exists()


def test_keep_going_runs_the_other_scenes_and_still_fails(client, scenes, random_model, tmp_path):
    """--keep-going: a scene that cannot run (a half-copied tile) is left out when planned, one that fails while
    running does not stop the queue; the others finish, job.json records each, and the job fails naming both
    (without it one bad tile held back every scene after it, on every nightly retry)."""
    from geoseg.jobs import execute
    from geoseg.jobs.runner import ScenesFailed

    for name in ("a", "b", "c"):
        shutil.copy(scenes / "data" / "field.tif", tmp_path / f"{name}.tif")
    (tmp_path / "d.tif").write_bytes((tmp_path / "c.tif").read_bytes()[:300])  # not a raster GDAL can read
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif", "b.tif", "c.tif", "d.tif"], model=str(random_model),
                    output="out", chunking={"chunk_size": 256}, outputs={"cog": False, "vectors": False}, scenes_in_flight=1)
    spec = load_job(job, env=NO_ENV, config_files=[])
    with pytest.raises(InputError, match="scene d"):
        plan(spec)  # without it: refused before anything runs
    jp = plan(spec, keep_going=True)
    assert [s.name for s, _ in jp.refused] == ["d"] and [sp.scene.name for sp in jp.scenes] == ["a", "b", "c"]
    (tmp_path / "a.tif").unlink()  # gone after the checks: the workers cannot read it
    with pytest.raises(ScenesFailed, match=r"2 of 4 scenes failed .*job\.json says which\):\n  - a: .*a\.tif.*\n  - d: "):
        execute(jp, client=client, keep_going=True)
    summary = json.loads((tmp_path / "out" / "job.json").read_text())
    assert summary["status"] == "failed"
    assert [(s["name"], s["status"]) for s in summary["scenes"]] == [("a", "failed"), ("b", "computed"), ("c", "computed"),
                                                                      ("d", "failed")]
    assert (tmp_path / "out" / "b" / "run.json").exists() and (tmp_path / "out" / "c" / "run.json").exists()


@pytest.mark.parametrize("delay", [0.15, 0.3])
def test_a_job_stopped_on_a_given_client_stops_its_scenes_there(client, scenes, random_model, tmp_path, delay):
    """Ctrl-C in a notebook running a job on its own client: the scenes in flight stop on the cluster too (the job's
    own connection closes, and the scheduler drops their tasks). They ran on to the end before, published run.json
    under a job.json that says they were stopped, and held their output's lock, so a --resume refused them. Later,
    a scene's thread that called the client (fut.result()) just as the connection closed waited for ever, still
    holding its lock (the connection's event loop stopped under it): one stop in a few, at 0.15-0.25 s."""
    import signal
    import threading
    import time

    from geoseg.jobs import execute

    for name in ("a", "b"):
        shutil.copy(scenes / "data" / "field.tif", tmp_path / f"{name}.tif")
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif", "b.tif"], model=str(random_model), output="out",
                    chunking={"chunk_size": 64}, outputs={"cog": True, "vectors": False}, scenes_in_flight=2)
    main = threading.main_thread().ident
    fired = []

    def report(msg: str) -> None:  # Ctrl-C soon after the first scene starts
        if not fired and msg.startswith("a:"):
            fired.append(threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT)))
            fired[0].start()

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as a terminal's (another import may
    try:                                                                 # have set its own: dask_jobqueue's exits)
        with pytest.raises(KeyboardInterrupt):
            execute(plan(load_job(job, env=NO_ENV, config_files=[])), client=client, report=report)
    finally:
        signal.signal(signal.SIGINT, handler)
    summary = json.loads((tmp_path / "out" / "job.json").read_text())
    stopped = [s["name"] for s in summary["scenes"] if s["status"] == "failed"]
    assert stopped and all("stopped before it finished" in s["error"] for s in summary["scenes"] if s["name"] in stopped)
    deadline = time.monotonic() + 20
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(client.processing().values())  # nothing of the job's runs on
    time.sleep(1.0)
    assert not any((tmp_path / "out" / name / "run.json").exists() for name in stopped)
    assert client.submit(sum, [1, 2]).result() == 3  # the given client works on
    done = execute(plan(load_job(job, env=NO_ENV, config_files=[]), resume=True), client=client)  # no lock left held
    assert [s["status"] for s in done["scenes"]] == ["computed"] * 2


def test_a_connection_to_a_scheduler_s_address_closed_under_calls_leaves_none_waiting(client):
    """A job on a scheduler's address (--scheduler, an address profile) that is stopped closes its client while its
    scenes' threads may be in a call on it. On a client's own event loop, which closing it stops, such a call
    waited for ever (and its scene held its OUT's lock); geoseg.cluster.connect holds the loop until after."""
    import threading
    import time

    from geoseg.cluster import connect

    for _ in range(3):
        with connect(client.scheduler.address) as c:
            go = threading.Event()

            def calls() -> None:
                while not go.is_set():
                    try:
                        c.scheduler_info(n_workers=-1)
                    except Exception:  # noqa: BLE001 - closed: what a call says then is not the point
                        pass

            threads = [threading.Thread(target=calls, daemon=True) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.05)
            c.close()  # as the job does when stopped, inside the connection
            go.set()
            for t in threads:
                t.join(10)
            assert not any(t.is_alive() for t in threads)


def _short_task(i: float) -> float:
    return i


def test_a_connection_closed_while_threads_submit_to_it_leaves_none_waiting(client):
    """A stopped job closes its connection while its scenes' threads submit and wait. A future made while the client
    closed, after it had cancelled its own and before it said it was closed, was never cancelled nor finished: the
    wait on it lasted for ever, and the scene held its OUT's lock (a --resume right after was refused, one full run
    of the suite in a few). geoseg.cluster.close_client ends them: every thread is out within seconds."""
    import threading
    import time

    from geoseg.cluster import close_client, connect

    stuck = 0
    for _ in range(30):
        with connect(client.scheduler.address) as c:
            def calls() -> None:
                try:
                    while True:
                        c.submit(_short_task, time.time(), pure=False).result()
                except BaseException:  # noqa: BLE001 - closed: cancelled, or refused; either ends the wait
                    pass

            threads = [threading.Thread(target=calls, daemon=True) for _ in range(12)]
            for t in threads:
                t.start()
            time.sleep(0.1)
            close_client(c)  # as the job does when stopped, inside the connection
            deadline = time.monotonic() + 5
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            stuck += sum(t.is_alive() for t in threads)
    assert stuck == 0


def test_a_job_given_an_asynchronous_client_is_refused_at_once(client, scenes, random_model, tmp_path):
    """A notebook's asynchronous client (await Client(..., asynchronous=True)), and a job run from the cell (its
    loop's thread): the job blocks that loop while it waits for its scenes, and it waited for ever. Refused, saying
    what to give instead; no scene output is written."""
    import asyncio

    from distributed import Client

    from geoseg.jobs import execute

    shutil.copy(scenes / "data" / "field.tif", tmp_path / "a.tif")
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif"], model=str(random_model), output="out",
                    chunking={"chunk_size": 128}, outputs={"cog": False, "vectors": False})

    async def cell() -> dict:
        async with Client(client.scheduler.address, asynchronous=True) as given:
            return execute(plan(load_job(job, env=NO_ENV, config_files=[])), client=given)

    with pytest.raises(ConfigError, match="asynchronous=True.*give a client made without"):
        asyncio.run(asyncio.wait_for(cell(), 120))
    assert not (tmp_path / "out" / "a" / "run.json").exists()


def test_dry_run_with_keep_going_shows_the_plan_the_run_would_follow(scenes, random_model, tmp_path):
    """--dry-run --keep-going plans as the run does: the scenes that can run, and the one left out with why
    (it ignored --keep-going and stopped at the unreadable scene, which the real run would leave out)."""
    shutil.copy(scenes / "data" / "field.tif", tmp_path / "a.tif")
    (tmp_path / "d.tif").write_bytes((tmp_path / "a.tif").read_bytes()[:300])  # not a raster GDAL can read
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif", "d.tif"], model=str(random_model), output="out")
    code, out = invoke("run", job, "--dry-run")
    assert code != 0 and "scene d" in out
    code, out = invoke("run", job, "--dry-run", "--keep-going")
    assert code == 0, out
    assert "plan: 1 of 1 scenes to compute" in out and "\na: compute" in out
    assert "d: left out (--keep-going):" in out and "d.tif" in out
    assert not (tmp_path / "out").exists()


def test_scenes_run_concurrently(client, scenes, random_model, tmp_path):
    """Two scenes in flight: the job takes less than its scenes' wall times added up, and each equals a lone run."""
    from geoseg.jobs import execute
    from geoseg.pipeline import PredictOptions, predict

    for name in ("a", "b", "c"):
        shutil.copy(scenes / "data" / "field.tif", tmp_path / f"{name}.tif")
    job = write_job(tmp_path / "job.yaml", scenes=["a.tif", "b.tif", "c.tif"], model=str(random_model), output="out",
                    chunking={"chunk_size": 64}, outputs={"cog": True, "vectors": True}, scenes_in_flight=2)
    summary = execute(plan(load_job(job, env=NO_ENV, config_files=[])), client=client)
    assert [s["status"] for s in summary["scenes"]] == ["computed"] * 3
    walls = [s["wall_s"] for s in summary["scenes"]]
    assert summary["wall_s"] < 0.9 * sum(walls), (summary["wall_s"], walls)
    alone = predict([tmp_path / "a.tif"], random_model, tmp_path / "alone", PredictOptions(chunk_size=64), client=client)
    from geoseg.io.zarr_store import open_prediction

    ref = open_prediction(tmp_path / "alone" / "prediction.zarr")["class_id"].values
    for name in ("a", "b", "c"):
        got = open_prediction(tmp_path / "out" / name / "prediction.zarr")["class_id"].values
        np.testing.assert_array_equal(got, ref)
    assert summary["cluster"]["numerics"]["precision"] == alone["numerics"]["precision"]


RACE = '''
import importlib, sys, threading
from affine import Affine
from odc.geo.geobox import GeoBox
from geoseg.tiling import TilingPlan
grid = GeoBox((64, 64), Affine(10, 0, 500000, 0, -10, 4000000), "EPSG:32617")
plan = TilingPlan.make((64, 64), stride=8, chunk_size=32, halo=0)
errors, start = [], threading.Barrier(3)
def run(name, *args):
    start.wait()
    try:  # the store module imported first here, in each thread, as a scene thread of geoseg run does
        getattr(importlib.import_module("geoseg.io.zarr_store"), name)(*args)
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=run, args=a) for a in (("create_store", sys.argv[1] + "/a.zarr", grid, plan, {}),
           ("create_store", sys.argv[1] + "/b.zarr", grid, plan, {}), ("store_attrs", sys.argv[1] + "/none.zarr"))]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
sys.exit(1 if errors else 0)
'''


def test_scenes_opening_their_stores_at_once_in_a_fresh_process(tmp_path):
    """geoseg run --resume with two scenes in flight, one with an interrupted store: each scene's thread imported
    zarr first at the same moment and one met a partially initialised module (ImportError, then KeyError 'zarr'),
    on every retry. A fresh process each time, as the race needs one."""
    import subprocess
    import sys

    for i in range(2):
        (tmp_path / str(i)).mkdir()
        r = subprocess.run([sys.executable, "-c", RACE, str(tmp_path / str(i))], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
