"""The ``cacara`` command: one subcommand per pipeline step, each a thin shell around the step function.

dvc stages call these subcommands; kfp components call the same functions directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from cacara.params import REPO_ROOT, load_params

log = logging.getLogger("cacara")


def _parse_set(values: Sequence[str]) -> dict[str, object]:
    """``--set split.seed=3`` overrides, values parsed as YAML scalars (so numbers stay numbers)."""
    import yaml

    out: dict[str, object] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _params(args: argparse.Namespace) -> dict:
    """params.yaml with the ``--set`` overrides, validated whole: a bad value fails before any work."""
    from cacara.config import validate_params

    params = load_params(args.params, _parse_set(args.set))
    validate_params(params)
    return params


def cmd_ingest(args: argparse.Namespace) -> int:
    from cacara.config import IngestConfig
    from components.ingest import ingest

    params = _params(args)
    if args.format:
        params["data"]["format"] = args.format
    result = ingest(args.source or params["data"]["source"], args.out, IngestConfig.from_params(params),
                    previous=args.previous, shard=args.shard, num_shards=args.num_shards)
    print(result.summary())
    return 0


def cmd_merge_shards(args: argparse.Namespace) -> int:
    from cacara.config import IngestConfig
    from components.ingest import merge_shards

    print(merge_shards(args.parts, args.out, IngestConfig.from_params(_params(args))).summary())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from cacara.config import ValidateConfig
    from components.validate import validate

    result = validate(args.dataset, args.reports, ValidateConfig.from_params(_params(args)))
    print(result.summary())
    return 0


def cmd_embed_captions(args: argparse.Namespace) -> int:
    from cacara.config import EmbedTextConfig
    from components.embed_text import embed_text

    print(embed_text(args.dataset, args.out, EmbedTextConfig.from_params(_params(args)), cache=args.cache).summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cacara.config import TrainConfig
    from components.train import train

    if args.config:  # a TrainConfig as JSON: what the Kubeflow train task hands torchrun workers
        config = TrainConfig.model_validate_json(Path(args.config).read_text(encoding="utf-8"))
    else:
        config = TrainConfig.from_params(_params(args))
    result = train(args.dataset, args.text_emb, args.out, config,
                   text_encoder=args.text_encoder, resume_from=args.resume_from,
                   max_epochs_this_run=args.max_epochs_this_run)
    print(result.summary())
    return 0


def _named(values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--model expects NAME=DIR, got {item!r}")
        if name in out:
            raise ValueError(f"--model {name} given twice")
        out[name] = folder
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cacara.config import EvaluateConfig
    from components.evaluate import evaluate

    config = EvaluateConfig.from_params(_params(args))
    result = evaluate(args.dataset, args.text_emb, _named(args.model), args.out, config, contrast=args.contrast)
    print(result.table(metric=config.evaluate.plot_metric))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from cacara.config import IndexConfig
    from components.index import build_index

    print(build_index(args.dataset, args.model, args.out, IndexConfig.from_params(_params(args)),
                      previous=args.previous).summary())
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from cacara.config import PackageConfig
    from components.package import package
    from pipelines.training import data_md5

    md5 = args.data_md5 or ""
    if not md5 and args.data_dvc:
        if Path(args.data_dvc).exists():
            md5 = data_md5(args.data_dvc)
        else:  # your own data, not tracked by that file: the model is packaged without a data hash
            logging.getLogger(__name__).warning("%s not found: no data md5 is recorded with the model", args.data_dvc)
    print(package(args.model, args.index, args.out, PackageConfig.from_params(_params(args)),
                  metrics=args.metrics, data_md5=md5, drift_reference=args.drift_reference).summary())
    return 0


def cmd_drift_profile(args: argparse.Namespace) -> int:
    from cacara.config import DriftProfileConfig
    from components.drift import profile_reference

    record = profile_reference(args.dataset, args.model, args.out, DriftProfileConfig.from_params(_params(args)))
    print(f"drift reference: {record['clips']} clips of {','.join(record['splits'])} -> {args.out}")
    return 0


DRIFT_CANNOT_COMPARE = 2  # `cacara drift`: the batches could not be compared (1: the gate failed)


def cmd_drift(args: argparse.Namespace) -> int:
    """Exit 1 when the gate fails (policy fail), naming the drifted columns; 2 when the batches cannot be
    compared (too few clips, a malformed manifest or log): a scheduler tells a drift from a quiet day."""
    from cacara.config import DriftConfig
    from components.drift import DriftGateFailed, DriftInputError, check_drift, format_summary

    config = DriftConfig.from_params(_params(args))
    try:
        summary = check_drift(args.reference, args.current, args.out, config, model_dir=args.model)
    except DriftGateFailed as exc:
        print(format_summary(exc.summary))
        raise
    except DriftInputError as exc:
        log.error("drift: cannot compare: %s", exc)
        return DRIFT_CANNOT_COMPARE
    print(format_summary(summary))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The Bento the package step built, served by ``bentoml serve`` in place of this process."""
    import shutil

    from components.package import MODEL_ENV, RECORD

    record_file = Path(args.package) / RECORD
    if not record_file.exists():
        raise FileNotFoundError(f"{record_file} is missing: package a model first (`make run` or `cacara package`)")
    record = json.loads(record_file.read_text())
    bentoml = shutil.which("bentoml") or str(Path(sys.executable).parent / "bentoml")
    argv = [bentoml, "serve", record["bento_tag"], "--host", args.host, "--port", str(args.port)]
    print(f"serving {record['model_tag']} (Bento {record['bento_tag']}) on http://{args.host}:{args.port}/", flush=True)
    os.execve(bentoml, argv, {**os.environ, MODEL_ENV: record["model_tag"]})
    return 0  # not reached


def cmd_pipeline(args: argparse.Namespace) -> int:
    """The Kubeflow pipeline: compile it, run it in kfp.local, or submit it to a cluster."""
    from pipelines import training

    params = _params(args)
    if args.source and args.data_md5 is None and args.action != "compile":
        # The md5 keys kfp's cache to the data: the demo's would let a changed source reuse stale results.
        raise ValueError("--source needs --data-md5 (the md5 your .dvc file records for that data)")
    md5 = args.data_md5 if args.data_md5 is not None else training.data_md5(REPO_ROOT / "data.dvc")
    if args.action == "compile":
        print(training.compile_pipeline(params, args.out or training.COMPILED, md5))
        return 0
    if args.action == "run-local":
        import time

        start = time.monotonic()
        root = Path(args.pipeline_root).resolve()
        training.run_local(params, root, args.source or params["data"]["source"], md5)
        print(f"pipeline finished in kfp.local in {time.monotonic() - start:.0f} s; outputs under {root}")
        return 0
    from pipelines.submit import submit

    result = submit(params, host=args.host, md5=md5, experiment=args.experiment, run_name=args.run_name,
                    namespace=args.namespace, source=args.source)
    print(f"submitted run {result.run_id} ({args.run_name or 'unnamed'}) to {args.host}")
    return 0


def _default_model() -> str:
    """The model the last ``make run`` trained, wherever the command is run from."""
    return os.environ.get("CACARA_MODEL") or str(REPO_ROOT / "work" / "train" / "model")


def cmd_embed_audio(args: argparse.Namespace) -> int:
    from cacara.embed import embed_audio_files

    emb = embed_audio_files(args.model or _default_model(), args.files,
                            max_bytes=int(_params(args)["audio"]["max_file_bytes"]))
    _save_npy(args.out, emb)
    return 0


def cmd_embed_text(args: argparse.Namespace) -> int:
    from cacara.embed import embed_texts, read_text_lines

    texts = read_text_lines(args.file) if args.file else list(args.texts)
    if not texts:
        raise ValueError("no texts given: pass TEXT arguments or --file TEXTS.txt")
    _save_npy(args.out, embed_texts(args.model or _default_model(), texts, args.language))
    return 0


def _save_npy(path: str, array) -> None:
    import numpy as np

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    log.info("wrote %s %s", path, array.shape)


def cmd_summary(args: argparse.Namespace) -> int:
    """What ``make run`` prints at the end: the reports of every stage that has run."""
    from cacara.summary import print_summary

    print_summary(Path(args.work), _params(args))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "ingest": (cmd_ingest, "source dataset -> canonical 16 kHz dataset + quarantine report"),
    "merge-shards": (cmd_merge_shards, "datasets ingested as shards -> one canonical dataset"),
    "validate": (cmd_validate, "Great Expectations suite over the canonical dataset"),
    "embed-captions": (cmd_embed_captions, "embed_text step: cache every caption's embedding per frozen tower"),
    "train": (cmd_train, "train the audio branch on English captions"),
    "evaluate": (cmd_evaluate, "multilingual retrieval metrics for every system"),
    "embed-audio": (cmd_embed_audio, "audio files -> (N, D) float32 .npy of L2-normalised embeddings"),
    "embed-text": (cmd_embed_text, "texts (any language) -> (N, D) float32 .npy in the same space"),
    "summary": (cmd_summary, "print the results of the last run"),
    "index": (cmd_index, "a dataset's clips embedded by a model, in a faiss index the service searches"),
    "package": (cmd_package, "quality gate, then the model and index into the BentoML store and a Bento"),
    "serve": (cmd_serve, "serve the last packaged model and its search page (bentoml serve) on loopback"),
    "drift-profile": (cmd_drift_profile, "a trained model's drift reference: its training clips' features and embeddings"),
    "drift": (cmd_drift, "Evidently drift report of a dataset or serving log against a reference; exit 1 on a failed gate"),
    "pipeline": (cmd_pipeline, "the Kubeflow pipeline: compile | run-local | submit"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacara", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        fn, help_text = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=None, help="params.yaml to read (default: the project's)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. --set split.seed=3")
        p.set_defaults(func=fn)
        return p

    p = add("ingest")
    p.add_argument("--source", default=None, help="folder, file or fsspec URL (default: params data.source)")
    p.add_argument("--format", default=None, help="auto|canonical|clotho|audiocaps|manifest")
    p.add_argument("--out", default="work/dataset", help="output folder for the canonical dataset")
    p.add_argument("--previous", default=None,
                   help="an earlier dataset whose unchanged clips are taken over instead of decoded (may be --out)")
    p.add_argument("--shard", type=int, default=0, help="with --num-shards: which shard of the rows to ingest")
    p.add_argument("--num-shards", type=int, default=1, help="split the rows by clip id into this many shards")
    p = add("merge-shards")
    p.add_argument("--out", required=True, help="output folder for the merged dataset")
    p.add_argument("parts", nargs="+", metavar="SHARD_DIR")
    p = add("validate")
    p.add_argument("--dataset", default="work/dataset")
    p.add_argument("--reports", default="reports/validation")
    p = add("embed-captions")
    p.add_argument("--dataset", default="work/dataset")
    p.add_argument("--out", default="work/text_emb")
    p.add_argument("--cache", default=None, help="an earlier output whose embeddings are reused (may be --out)")
    p = add("train")
    p.add_argument("--dataset", default="work/dataset")
    p.add_argument("--text-emb", default="work/text_emb")
    p.add_argument("--out", default="work/train")
    p.add_argument("--text-encoder", default=None, help="frozen tower (default: params model.text_encoder)")
    p.add_argument("--config", default=None,
                   help="the training settings as a JSON TrainConfig instead of params.yaml (multi-node workers)")
    p.add_argument("--resume-from", default=None,
                   help="checkpoints folder of an interrupted run to continue (may be OUT/checkpoints)")
    p.add_argument("--max-epochs-this-run", type=int, default=None,
                   help="stop after this many epochs with a checkpoint; the next run resumes")
    p = add("evaluate")
    p.add_argument("--dataset", default="work/dataset")
    p.add_argument("--text-emb", default="work/text_emb")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a trained model to score (repeat; the first is the model under test)")
    p.add_argument("--contrast", default=None, metavar="NAME",
                   help="the --model trained against the English-only tower, compared with the first")
    p.add_argument("--out", default="reports/evaluate")
    p = add("embed-audio")
    p.add_argument("--model", default=None, help="model folder (default: the last `make run`'s)")
    p.add_argument("--out", required=True, help="output .npy, shape (N, D)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p = add("embed-text")
    p.add_argument("--model", default=None, help="model folder (default: the last `make run`'s)")
    p.add_argument("--out", required=True, help="output .npy, shape (N, D)")
    p.add_argument("--file", default=None, help="UTF-8 file, one text per line")
    p.add_argument("--language", default=None,
                   help="language code of the texts (de, pt-BR, ...): centres them by that language's mean; "
                        "without it the overall mean is used")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p = add("index")
    p.add_argument("--dataset", default="work/dataset")
    p.add_argument("--model", default="work/train/model")
    p.add_argument("--out", default="work/index")
    p.add_argument("--previous", default=None, help="an earlier index whose unchanged clips keep their vectors")
    p = add("package")
    p.add_argument("--model", default="work/train/model")
    p.add_argument("--index", default="work/index")
    p.add_argument("--metrics", default=None, help="the evaluate step's metrics.json, recorded with the model")
    p.add_argument("--data-md5", default=None, help="the dataset's DVC md5, recorded with the model")
    p.add_argument("--data-dvc", default=None, help="or the .dvc file that records it")
    p.add_argument("--drift-reference", default=None,
                   help="the drift-profile step's output, stored with the model (the service logs against it)")
    p.add_argument("--out", default="work/package")
    p = add("serve")
    p.add_argument("--package", default="work/package", help="the package step's output (its package.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p = add("drift-profile")
    p.add_argument("--dataset", default="work/dataset")
    p.add_argument("--model", default="work/train/model")
    p.add_argument("--out", default="work/drift_reference")
    p = add("drift")
    p.add_argument("--reference", default="work/drift_reference",
                   help="a saved profile (cacara drift-profile) or a canonical dataset folder")
    p.add_argument("--current", required=True, help="a canonical dataset folder, or a serving log (file or folder)")
    p.add_argument("--model", default=None,
                   help="the model that embeds the clips of a dataset given as --reference or --current")
    p.add_argument("--out", default="reports/drift")
    p = add("pipeline")
    p.add_argument("action", choices=["compile", "run-local", "submit"])
    p.add_argument("--out", default=None, help="compile: where to write the YAML (default pipelines/training.yaml)")
    p.add_argument("--data-md5", default=None, help="the dataset's DVC md5 (default: the one data.dvc records)")
    p.add_argument("--source", default=None, help="run-local/submit: the dataset source (default: params data.source)")
    p.add_argument("--pipeline-root", default="work/kfp", help="run-local: where kfp.local writes the artifacts")
    p.add_argument("--host", default=None, help="submit: the Kubeflow Pipelines API, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--experiment", default="cacara", help="submit: experiment name (created when missing)")
    p.add_argument("--run-name", default=None, help="submit: the run's name")
    p.add_argument("--namespace", default=None, help="submit: the profile namespace (default: params cluster.namespace)")
    p = add("summary")
    p.add_argument("--work", default=".", help="project folder holding work/ and reports/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("great_expectations", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as exc:
        log.error("%s failed: %s", args.command, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
