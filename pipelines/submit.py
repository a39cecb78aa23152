"""Submitting the compiled DAG to Vertex AI Pipelines or Kubeflow Pipelines."""

import tempfile
from typing import Optional

from pipelines.palp_pipeline import PIPELINE_NAME, compile_pipeline
from pipelines.quota import DEFAULT_MAX_PARALLEL


def _temp_yaml() -> str:
    with tempfile.NamedTemporaryFile(prefix="palp-pipeline-", suffix=".yaml", delete=False) as f:
        return f.name


def vertex_job(package: str, params: dict, *, project: str, region: str, pipeline_root: str, credentials=None,
               enable_caching: bool = True):
    """The Vertex AI PipelineJob for a compiled package (not yet submitted)."""
    from google.cloud import aiplatform

    return aiplatform.PipelineJob(
        display_name=PIPELINE_NAME, template_path=package, pipeline_root=pipeline_root, parameter_values=params,
        project=project, location=region, enable_caching=enable_caching, credentials=credentials,
    )


def submit_vertex(params: dict, *, project: str, region: str, pipeline_root: str, experiment: Optional[str] = None,
                  service_account: Optional[str] = None, accelerator: Optional[str] = None, backend: str = "vertex",
                  max_parallel: int = DEFAULT_MAX_PARALLEL):
    package = compile_pipeline(backend, _temp_yaml(), accelerator=accelerator, max_parallel=max_parallel)
    job = vertex_job(package, params, project=project, region=region, pipeline_root=pipeline_root)
    job.submit(service_account=service_account, experiment=experiment)
    return job


def kubeflow_run_args(package: str, params: dict, *, experiment: Optional[str] = None,
                      pipeline_root: Optional[str] = None) -> dict:
    """Keyword arguments of kfp.Client.create_run_from_pipeline_package (``pipeline_root``
    None: the cluster's default root)."""
    return {"pipeline_file": package, "arguments": params, "run_name": PIPELINE_NAME,
            "experiment_name": experiment, "enable_caching": True, "pipeline_root": pipeline_root}


def submit_kubeflow(params: dict, *, host: str, experiment: Optional[str] = None, accelerator: Optional[str] = None,
                    pipeline_root: Optional[str] = None, max_parallel: int = DEFAULT_MAX_PARALLEL):
    import kfp

    package = compile_pipeline("kubeflow", _temp_yaml(), accelerator=accelerator, max_parallel=max_parallel)
    args = kubeflow_run_args(package, params, experiment=experiment, pipeline_root=pipeline_root)
    return kfp.Client(host=host).create_run_from_pipeline_package(**args)
