"""The ``hf-chts`` command: ``train``, ``eval``, ``bench-inference``, ``inspect``, ``export``.

Each subcommand lives with the code it drives; this module only parses
arguments and dispatches, so ``hf-chts --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

USER_ERROR_STATUS = 2
INTERNAL_ERROR_STATUS = 1
REPORT_HINT = ("this is a bug in hf_chts, not in your input: please report it with the command you ran and the "
               "traceback above")


class _OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line (``prog: error: ... (see prog --help)``), exit status 2."""

    def error(self, message: str):
        self.exit(USER_ERROR_STATUS, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (recipe, checkpoint, flag, folder, environment): one line, exit status 2.

    ``UserError``, ``ValueError``, ``OSError``, a missing optional package, and the
    error safetensors raises for a malformed file. (Imported here, not at module
    level, so ``hf-chts --help`` stays light.)
    """
    from .errors import UserError

    errors: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, ModuleNotFoundError)
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency of transformers
        return errors
    return (*errors, SafetensorError)


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model sparse from a YAML recipe",
        description="Train from a YAML recipe (see recipes/README.md). Extra `--key value` pairs override recipe "
        "fields in HfArgumentParser's syntax, e.g. `--training.max_steps 50 --sparsify.target_density 0.1` (a field "
        "name that only one section has works bare: `--learning_rate 1e-3`). Runs on one process; for several, "
        "use `accelerate launch -m hf_chts.recipe.pretrain --config <recipe.yaml>`.",
    )
    parser.add_argument("recipe", help="path to a recipe YAML file, e.g. recipes/tiny-llama-cpu.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder that holds another run")
    parser.set_defaults(handler="hf_chts.recipe:train_command", allow_extra=True)


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot evaluation of a sparse checkpoint with lm-eval-harness",
        description="Run lm-eval tasks on a checkpoint folder or Hub repo id (dense, masked or compact format) and "
        "write lm-eval's results JSON with the model's density and ANP added. The checkpoint is not modified "
        "unless --update-card is given.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", default=None, help="folder of extra task YAMLs (local tasks)")
    parser.add_argument("--output-path", "--output", dest="output_path", default=None,
                        help="where lm-eval's EvaluationTracker saves the results: a folder (<folder>/<model>/"
                        "results_<time>.json) or a .json path (<name>_<time>.json); default: ./eval_results (never "
                        "inside the checkpoint)")
    parser.add_argument("--update-card", action="store_true",
                        help="also add the results to the checkpoint's hf_chts model card (a new save of its card "
                        "and sparsity files); without it the checkpoint is only read")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=float, default=None, help="evaluate only this many examples per task")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--model-args", default=None,
                        help="lm-eval style key=value pairs: dtype (float32, bfloat16, float16, auto) and device "
                        "(cuda, cuda:1, mps, cpu), e.g. dtype=bfloat16,device=cuda; default device: the best available")
    parser.add_argument("--device", default=None, help="same as --model-args device=... (default: best available)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap iterations for the stderr of non-mean metrics (0 skips them)")
    parser.add_argument("--inference", action="store_true",
                        help="evaluate the inference-only sparse model (load_sparse(..., inference=True))")
    parser.add_argument("--kernel", choices=("auto", "csr", "dense"), default="auto",
                        help="sparse kernel with --inference (default auto: per layer, whichever is faster)")
    parser.set_defaults(handler="hf_chts.evaluation:eval_command")


def _add_bench_inference(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench-inference",
        help="speed and memory of a sparse checkpoint's inference model vs its dense twin",
        description="Load the checkpoint as an inference-only sparse model and as its masked dense twin, and print "
        "prefill and decode tokens/s, peak memory, weight bytes, the kernel per layer type and the largest logit "
        "difference (timings interleaved in one run; see docs/inference.md).",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    parser.add_argument("--kernel", choices=("auto", "csr", "dense"), default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoding steps per measurement")
    parser.add_argument("--decode-batches", default="1,8", help="comma-separated decode batch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (best round reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(handler="hf_chts.inference.bench_command:bench_inference_command")


def _add_inspect(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print a checkpoint's per-layer density, ANP, size on disk and schedule position",
        description="Summarise a sparse checkpoint without building the model's forward.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(handler="hf_chts.checkpoint:inspect_command")


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="rewrite a checkpoint as dense (zeros at masked positions) or compact (live values only)",
        description="Convert a sparse checkpoint. `dense` stores full weight tensors that any HF loader reads; "
        "`compact` stores only the live values plus bit-packed masks (load it with hf_chts.load_sparse).",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or Hub repo id")
    parser.add_argument("output", help="output folder (must not exist or be empty)")
    parser.add_argument("--format", choices=("dense", "compact"), default="dense")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="then upload the output folder to this Hub repo (created if needed)")
    parser.add_argument("--private", action="store_true", default=None, help="create the Hub repo private")
    parser.set_defaults(handler="hf_chts.checkpoint:export_command")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="hf-chts",
        description="Brain-inspired dynamic sparse training (CHTs / CHTss) for Hugging Face causal LMs.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of every error (also accepted after the subcommand)")
    subparsers = parser.add_subparsers(dest="command", required=True,
                                       metavar="{train,eval,bench-inference,inspect,export}")
    for add in (_add_train, _add_eval, _add_bench_inference, _add_inspect, _add_export):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``hf-chts`` command; returns the exit status.

    Bad input (``UserError``, ``ValueError``, ``OSError``, a missing optional
    package, a bad flag) prints one line and returns 2; any other exception is an
    internal error: traceback, a request to report it, status 1. ``--debug``
    shows the traceback of user errors too.
    """
    from .verbosity import enable_command_line_messages

    enable_command_line_messages()  # hf_chts's messages (logger "hf_chts", INFO and above) on stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "allow_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help (0) or a usage error (2, already printed on one line)
        return done.code if isinstance(done.code, int) else USER_ERROR_STATUS
    args.overrides = extra
    prog = f"hf-chts {args.command}"
    try:
        module_name, function_name = args.handler.split(":")
        import importlib

        handler = getattr(importlib.import_module(module_name), function_name)
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted below: bad input (exit 2) or a bug (exit 1)
        import traceback

        if not isinstance(error, user_errors()):
            traceback.print_exc()
            print(f"{prog}: internal error: {type(error).__name__}: {one_line(error)}; {REPORT_HINT}", file=sys.stderr)
            return INTERNAL_ERROR_STATUS
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(error) or type(error).__name__}", file=sys.stderr)
        return USER_ERROR_STATUS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
