"""`geoseg run`: a declarative job (pipelines/NAME.yaml): many scenes, one model, one cluster."""

from __future__ import annotations

import contextlib
import logging
import sys

import click
import yaml

from geoseg.cli import options as opt


@click.command(short_help="Run a job file: many scenes on one cluster.")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Recompute finished scenes, also those finished with another model or parameters.")
@click.option("--resume", is_flag=True, help="Reuse the chunks interrupted runs finished; recompute scenes finished with another model or parameters.")
@opt.scheduler_opt
@click.option("--profile", default=None, metavar="NAME", help="Cluster profile to use (cluster.profiles in the job file, dask config or defaults).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override one setting, for example --set chunking.chunk_size=1024 (repeatable).")
@click.option("--keep-going", is_flag=True,
              help="A scene that fails, or cannot run, does not stop the others; the job still exits non-zero naming "
                   "every failed scene (a nightly job's one bad tile no longer holds back the rest).")
@click.option("--dry-run", is_flag=True, help="Print the resolved settings, the cluster and what each scene would do; run nothing.")
@click.pass_context
def run(ctx, job_file, overwrite, resume, scheduler, profile, settings, keep_going, dry_run):
    """Segment every scene of JOB_FILE into its own folder under the job's output root.

    \b
    Settings come in layers, later wins: geoseg's defaults, dask config files
    (~/.config/dask/*.yaml, key geoseg:), the job file, the environment
    (DASK_GEOSEG__CHUNKING__CHUNK_SIZE=1024), then --profile/--scheduler/--set.
    Every scene is checked before any cluster starts. Finished scenes (same inputs,
    model and parameters) are reused; job.json in the output root records the run.
    """
    opt.check_overwrite_resume(overwrite, resume)
    verbosity = ctx.obj["verbosity"] if ctx.obj else 0
    with _quiet_dask(verbosity < 2):
        _run(job_file, overwrite, resume, scheduler, profile, settings, dry_run, verbosity, keep_going)


@contextlib.contextmanager
def _quiet_dask(quiet: bool):
    """distributed's INFO lines (cluster start, every client) only with -vv.

    The group's root handler would print them; its intent is dask only when something is wrong.
    """
    import distributed  # noqa: F401  (its import sets its loggers' levels: set ours after)

    logger = logging.getLogger("distributed")
    old = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def _run(job_file, overwrite, resume, scheduler, profile, settings, dry_run, verbosity, keep_going=False) -> None:
    from geoseg.io import storage
    from geoseg.jobs.runner import execute, format_summary, plan
    from geoseg.jobs.spec import resolve

    spec = resolve(job_file, profile=profile, scheduler=scheduler, settings=settings)
    if dry_run:
        _print_dry_run(spec, overwrite, resume, keep_going)
        return
    if spec.profile.kind == "local":  # the workers' imports start now, while the job is planned (geoseg.forkserver)
        from geoseg import forkserver

        forkserver.start()
    jp = plan(spec, overwrite=overwrite, resume=resume, keep_going=keep_going)
    say = click.echo if verbosity >= 0 else None
    if say and jp.refused:
        for scene, error in jp.refused:
            say(f"{scene.name}: cannot run ({error}); the others go on (--keep-going)")
    if say and jp.todo:
        say(f"job {spec.job_name}: {len(jp.scenes)} scenes, {len(jp.todo)} to compute, "
            f"{len(jp.scenes) - len(jp.todo)} finished; cluster profile {spec.cluster.profile} ({spec.profile.kind})")
    with opt.sigterm_as_ctrl_c() as stop:
        try:
            summary = execute(jp, progress=verbosity >= 0 and sys.stderr.isatty(), report=say, keep_going=keep_going)
        except KeyboardInterrupt:
            click.echo(f"geoseg: stopped; {storage.join(spec.output_root, 'job.json')} says which scenes finished. Run "
                       "the same command with --resume (in place of --overwrite) to reuse the chunks done", err=True)
            sys.exit(143 if stop.terminated else 130)
    if verbosity < 0:
        return
    if summary["status"] == "nothing to do":
        click.echo(f"nothing to do: all {len(jp.scenes)} scenes of {job_file} are finished with the same inputs, "
                   "model and parameters (pass --overwrite to recompute them)")
    click.echo(format_summary(summary))
    if summary["status"] != "nothing to do":
        click.echo(f"summary written to {storage.join(spec.output_root, 'job.json')}")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # manifests are read by people and kubectl: no &anchors
        return True


def _yaml(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False).rstrip()


def _print_dry_run(spec, overwrite: bool, resume: bool, keep_going: bool = False) -> None:
    from geoseg.jobs.runner import plan

    layers = " < ".join(layer.name for layer in spec.layers)
    click.echo(f"# {spec.source}: resolved settings ({layers})")
    click.echo(_yaml(spec.settings()))
    profile = spec.profile
    click.echo(f"\n# cluster profile {spec.cluster.profile} ({profile.kind})")
    if profile.kind == "slurm":
        click.echo("# worker job script (one per job; geoseg run submits it with sbatch):")
        if profile.tls:
            click.echo("# (with tls: true, dask-jobqueue makes temporary certificates and adds --tls-ca-file, --tls-cert and\n"
                       "#  --tls-key to the script it submits; the workers read them from shared_temp_directory)")
        click.echo(profile.job_script().rstrip())
    elif profile.kind == "kubernetes":
        address = profile.scheduler_address()
        click.echo(f"# scheduler: {address or '(none set: create: true or DASK_SCHEDULER_ADDRESS)'}")
        if profile.tls:
            click.echo(f"# TLS: the pods take the cluster's certificates from the Secret {profile.secret} (ca.crt, tls.crt, tls.key):\n"
                       f"#   kubectl create secret generic {profile.secret} --from-file=ca.crt=CA --from-file=tls.crt=CERT "
                       "--from-file=tls.key=KEY")
        if profile.address and not profile.create:
            # this profile's fields would describe some other cluster than the one it reaches
            click.echo("# geoseg connects to the running cluster at this address and makes none (no manifest)")
        else:
            click.echo("# DaskCluster manifest " + ("(geoseg makes this cluster):" if profile.create else
                                                    "(kubectl apply -f -, or a DaskJob's spec.cluster.spec):"))
            click.echo(_yaml(profile.manifest()))
    jp = plan(spec, overwrite=overwrite, resume=resume, keep_going=keep_going)  # as the run would plan it
    click.echo(f"\n# plan: {len(jp.todo)} of {len(jp.scenes)} scenes to compute")
    for sp in jp.scenes:
        p = sp.job.plan
        click.echo(f"{sp.scene.name}: {sp.action} ({sp.reason}); {p.shape[0]} x {p.shape[1]} px, {len(p)} chunks "
                   f"of {p.chunk_size} px, halo {p.halo} px -> {sp.scene.out_dir}")
    for scene, why in jp.refused:  # --keep-going: left out of the run, which still fails for them
        click.echo(f"{scene.name}: left out (--keep-going): {why}")
