"""Declarative jobs: a YAML job file names scenes, model, output root, chunking and cluster
profile; ``geoseg run JOB`` checks every scene, then runs them all on one cluster.

``validate_spec`` checks a job file's settings alone; ``load_job(path, check_inputs=True)``
also checks every input; ``run`` plans and runs. See ``geoseg.jobs.spec`` for the schema.
"""

from geoseg.jobs.runner import JOB_NAME, JobPlan, ScenePlan, execute, load_job, plan, run
from geoseg.jobs.spec import JobSpec, Scene, resolve, validate_spec

__all__ = ["JOB_NAME", "JobPlan", "JobSpec", "Scene", "ScenePlan", "execute", "load_job", "plan", "resolve", "run",
           "validate_spec"]
