"""The ``palp`` command: the library's commands (``palp.cli``) plus ``palp pipeline``
(compile, run-local, submit), which drive kfp and so live above the library.

Imports nothing of kfp until a pipeline command runs, so ``palp train`` and the other
library commands start as fast as ``python -m palp``.
"""

from __future__ import annotations

import argparse
import sys

from palp import cli
from pipelines.errors import PipelineError
from pipelines.quota import DEFAULT_MAX_PARALLEL
from pipelines.runs_compare import add_runs_parser


def add_pipeline_parser(sub) -> None:
    pipe = sub.add_parser("pipeline", help="compile, run locally, or submit the KFP pipeline")
    psub = pipe.add_subparsers(dest="pipeline_command", required=True)
    c = psub.add_parser("compile", help="compile the DAG to a pipeline YAML", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--backend", choices=("vertex", "kubeflow", "vertex-tpu"), required=True)
    c.add_argument("--accelerator", help="Vertex: NVIDIA_L4, NVIDIA_A100_80GB, NVIDIA_H100_80GB...; Kubeflow: nvidia.com/gpu; "
                                         "vertex-tpu: TPU_V3 or TPU_V5_LITE_PODSLICE")
    c.add_argument("--image", help="step image (default: the palp image of this version)")
    c.add_argument("--output", required=True)
    c.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL, metavar="N",
                   help=f"trainings running at once (KFP ParallelFor parallelism; default {DEFAULT_MAX_PARALLEL}: a new "
                        f"project's GPU quota is a handful per region)")
    c.set_defaults(func=run_pipeline_compile)
    r = psub.add_parser("run-local", help="run the whole DAG with kfp.local", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--config", help="experiment YAML (default: evaluation/experiments/demo.yaml, the embedded demo)")
    r.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess")
    r.add_argument("--pipeline-root", help="where artifacts go (default: a new temporary folder)")
    r.add_argument("--image", help="with --runner docker: the step image (default: palp-cpu:<version>, built locally)")
    r.add_argument("--train-image", help="with --runner docker: the train step's image, where it differs, e.g. "
                                         "palp-tpu:<version> (with PJRT_DEVICE=CPU set: XLA on the CPU, no TPU needed)")
    r.add_argument("--gpus", action="store_true", help="with --runner docker: pass the host's GPUs to the steps")
    r.add_argument("--share-cache", action="store_true",
                   help="speed option: steps share one model cache (default: each starts empty, as on a cluster)")
    r.add_argument("--verbose", dest="stream", action="store_true",
                   help="stream every step's output as kfp.local prints it (default: one line per step start and end; "
                        "the output is in <pipeline-root>/logs/ either way)")
    r.set_defaults(func=run_pipeline_local)
    s = psub.add_parser("submit", help="submit to Vertex AI Pipelines or Kubeflow Pipelines",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--backend", choices=("vertex", "kubeflow", "vertex-tpu"), required=True)
    s.add_argument("--config", help="experiment YAML (default: the embedded demo)")
    s.add_argument("--accelerator")
    s.add_argument("--project", help="Vertex: GCP project")
    s.add_argument("--region", help="Vertex: region, e.g. us-central1")
    s.add_argument("--pipeline-root", help="gs:// root for artifacts (Vertex: required; Kubeflow: default the cluster's); "
                                         "local inputs are uploaded under it, to inputs/<content hash>/")
    s.add_argument("--service-account", help="Vertex: service account the run uses")
    s.add_argument("--host", help="Kubeflow: the KFP API endpoint")
    s.add_argument("--experiment", help="Vertex Experiments / KFP experiment name")
    s.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL, metavar="N",
                   help=f"trainings running at once (default {DEFAULT_MAX_PARALLEL}; each holds one GPU at a time)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the parameter values the cluster would receive (JSON) and stop: nothing uploaded or submitted")
    s.set_defaults(func=run_pipeline_submit)


def run_pipeline_compile(args) -> int:
    import inspect

    from pipelines.memory import table
    from pipelines.palp_pipeline import DEFAULT_ACCELERATOR, build_pipeline, compile_pipeline

    print(compile_pipeline(args.backend, args.output, accelerator=args.accelerator, image=args.image,
                           max_parallel=args.max_parallel))
    defaults = {n: p.default for n, p in inspect.signature(build_pipeline().pipeline_func).parameters.items()
                if p.default is not inspect.Parameter.empty}
    print("with the pipeline's default settings, " + table(defaults, args.accelerator or DEFAULT_ACCELERATOR[args.backend]),
          end="", file=sys.stderr)
    return 0


def run_pipeline_local(args) -> int:
    from pipelines.console import StepFailed
    from pipelines.run import run_local

    try:
        root = run_local(args.config, runner=args.runner, pipeline_root=args.pipeline_root, image=args.image,
                         train_image=args.train_image, gpus=args.gpus, share_cache=args.share_cache,
                         verbose=args.stream or args.verbose)
    except StepFailed as e:
        print(f"palp pipeline run-local: error: {e}", file=sys.stderr)
        return 1
    print_summary(root)
    return 0


def print_summary(root) -> None:
    """Where a finished local run's artifacts and logs are, its comparison table and its report."""
    from pipelines.console import newest_logs
    from pipelines.run import find_outputs, newest_run

    run = newest_run(root)
    print(f"\nartifacts under {run}/ (logs: {newest_logs(root)}/):")
    outputs = find_outputs(root)
    for task, paths in outputs.items():
        print(f"  {task}/: {' '.join(p.name for p in paths)}")
    table = [p for p in outputs.get("compare", []) if p.name == "table"]
    if table:
        print("\ncomparison (Table 2 shape):\n" + table[0].read_text().rstrip())
    report = run / "compare" / "scores" / "report.html" if run else None
    if report and report.is_file():
        print(f"\nreport: {report}")


def run_pipeline_submit(args) -> int:
    import json

    from palp.core.settings import ConfigError
    from pipelines.experiment import ExperimentError, load_experiment
    from pipelines.inputs import portable_inputs
    from pipelines.memory import refusal, table
    from pipelines.palp_pipeline import DEFAULT_ACCELERATOR
    from pipelines.submit import submit_kubeflow, submit_vertex

    params = load_experiment(args.config)
    card = args.accelerator or DEFAULT_ACCELERATOR[args.backend]
    why = refusal(params, card)  # before anything is uploaded or submitted
    if why:
        raise ExperimentError(f"{args.config or 'the demo'}: {why}")
    if not args.dry_run:  # checked before anything is uploaded
        if args.backend == "kubeflow" and not args.host:
            raise ConfigError("--backend kubeflow needs --host")
        missing = [f for f, v in (("--project", args.project), ("--region", args.region), ("--pipeline-root", args.pipeline_root))
                   if not v]
        if args.backend != "kubeflow" and missing:
            raise ConfigError(f"--backend {args.backend} needs {', '.join(missing)}")
    from pipelines.palp_pipeline import fan_out_size

    trainings = fan_out_size(params)  # from the local files, before they become gs:// copies
    # Nothing of this machine travels: local inputs become content-addressed gs:// copies.
    params = portable_inputs(params, args.pipeline_root, upload=not args.dry_run, say=lambda line: print(line, file=sys.stderr))
    if args.dry_run:
        print(json.dumps(params, indent=2, sort_keys=True))
        n = trainings
        print(f"fan-out: {n} training(s), each a train, a sample and a score step on one GPU: {3 * n} GPU jobs, at most "
              f"{min(n, args.max_parallel)} at once (--max-parallel {args.max_parallel})", file=sys.stderr)
        print(table(params, card), end="", file=sys.stderr)
        print("dry run: nothing uploaded, nothing submitted", file=sys.stderr)
        return 0
    if args.backend == "kubeflow":
        run = submit_kubeflow(params, host=args.host, experiment=args.experiment, accelerator=args.accelerator,
                              pipeline_root=args.pipeline_root, max_parallel=args.max_parallel)
        print(f"submitted: run {getattr(run, 'run_id', run)}")
        return 0
    job = submit_vertex(params, project=args.project, region=args.region, pipeline_root=args.pipeline_root,
                        experiment=args.experiment, service_account=args.service_account, accelerator=args.accelerator,
                        backend=args.backend, max_parallel=args.max_parallel)
    print(f"submitted: {job.resource_name}")
    return 0


def main(argv: list[str] | None = None, *, raise_errors: bool = False) -> int:
    """``palp …``: every library command and ``palp pipeline``."""
    return cli.main(argv, raise_errors=raise_errors, commands=[add_pipeline_parser, add_runs_parser], errors=(PipelineError,))


if __name__ == "__main__":
    sys.exit(main())
