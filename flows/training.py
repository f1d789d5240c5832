"""A training run from an entry point's side (the `train` command, the cycle, the
benchmarks): set up the process (device, seed, ranks), load the model from its
directory, and hand the trainer a run directory to write to."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from connectors.serving.fingerprint import model_fingerprint
from connectors.training.models import check_model_dir, load_policy, load_tokenizer
from connectors.training.run_dir import RunDir
from pipeline.feedback.balance import Balance
from pipeline.feedback.examples import Example
from pipeline.feedback.snapshot import RepeatPolicy, Snapshot
from pipeline.training.errors import TrainError
from pipeline.training.judge import Judge
from pipeline.training.manifest import Provenance
from pipeline.training.options import LoraOptions, TrainOptions
from pipeline.training.progress import Progress, silent
from pipeline.training.runtime import Runtime
from pipeline.training.sharding import checkpoint_activations, shard
from pipeline.training.trainer import TrainData, TrainResult, train


@dataclass(frozen=True)
class TrainInputs:
    """What to train on and where the result goes."""

    base_model: Path
    train: Sequence[Example]
    out_dir: Path
    heldout: Sequence[Example] = ()
    general: Sequence[Example] = ()
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    balance_explanation: str = ""
    snapshot_id: str | None = None
    init_adapter: Path | None = None
    reference_adapter: Path | None = None
    chat_template: str | None = None
    resume: bool = False
    progress: bool = True
    plots: bool = True
    extra_manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_snapshot(
        cls,
        snap: Snapshot,
        balance: Balance,
        base_model: Path,
        out_dir: Path,
        repeats: RepeatPolicy = "keep",
        **more: Any,
    ) -> TrainInputs:
        """Train on the snapshot's train split, evaluate on its held-out split, with the
        class weights chosen for it (from `snap.class_counts("train", repeats)`), the
        votes of repeated answers counted as `repeats` says; `more` sets the other
        fields. The snapshot's feedback window goes into the manifest, so that
        registering the adapter later names the votes it learned from."""
        extra = dict(more.pop("extra_manifest", {}))
        if snap.window is not None:
            extra.setdefault("snapshot_window", snap.window.as_dict())
        return cls(
            base_model=base_model,
            train=snap.records("train", repeats),
            heldout=snap.records("heldout", repeats),
            out_dir=out_dir,
            desirable_weight=balance.lambda_desirable,
            undesirable_weight=balance.lambda_undesirable,
            balance_explanation=balance.explanation,
            snapshot_id=snap.id,
            extra_manifest=extra,
            **more,
        )


def run_training(
    inputs: TrainInputs,
    options: TrainOptions,
    lora: LoraOptions | None = None,
    judge: Judge | None = None,
) -> TrainResult:
    """Train an adapter into `inputs.out_dir` and return the result (with `adapter_dir`
    set when an adapter was written).

    Raises:
        TrainError: bad input, found before anything is written; DivergedError,
            GeneralAbilityError: the run failed and wrote no adapter.
    """
    lora = lora or LoraOptions()
    check_model_dir(inputs.base_model)
    with _process_group(options):
        return _run(inputs, options, lora, judge)


def _run(
    inputs: TrainInputs, options: TrainOptions, lora: LoraOptions, judge: Judge | None
) -> TrainResult:
    runtime = runtime_for(options)
    seed_everything(options.seed)
    tokenizer = load_tokenizer(inputs.base_model, inputs.chat_template)
    sharded = options.fsdp or runtime.world > 1
    model = load_policy(
        inputs.base_model,
        lora,
        # A sharded model is loaded on the CPU; each rank's shards then go to its device.
        torch.device("cpu") if sharded else runtime.device,
        runtime.weights_dtype,
        inputs.init_adapter,
        inputs.reference_adapter,
    )
    if options.activation_checkpointing:
        checkpoint_activations(model.get_base_model())
    if sharded:
        shard(model.get_base_model(), runtime)
    provenance = Provenance(
        base_model=str(inputs.base_model),
        base_model_fingerprint=model_fingerprint(inputs.base_model),
        snapshot_id=inputs.snapshot_id,
        init_adapter=_text(inputs.init_adapter),
        reference_adapter=_text(inputs.reference_adapter),
        lora=asdict(lora),
        versions=package_versions(),
        extra=inputs.extra_manifest,
    )
    data = TrainData(
        inputs.train,
        inputs.heldout,
        inputs.general,
        inputs.desirable_weight,
        inputs.undesirable_weight,
        inputs.balance_explanation,
    )
    run = RunDir(inputs.out_dir, resume=inputs.resume, plots=inputs.plots)
    progress = _bars() if inputs.progress and runtime.main else silent
    result = train(model, tokenizer, data, options, run, runtime, provenance, progress, judge)
    return replace(result, adapter_dir=inputs.out_dir if result.manifest else None)


def run_training_on(
    inputs: TrainInputs,
    options: TrainOptions,
    lora: LoraOptions | None = None,
    nproc: int = 1,
) -> TrainResult:
    """`run_training` in `nproc` processes on this machine (torchrun), from a process
    that is none of them (the cycle's flow); in this process when nproc is 1.

    The inputs travel to the ranks pickled in a temporary directory; rank 0 sends back
    the result, or the error the run raised, which is raised here as it was there. The
    launcher dies with this process, and the ranks with the launcher.

    Raises:
        TrainError: as run_training, or the ranks ended without a result (the last
            lines of their log say why).
    """
    if nproc <= 1:
        return run_training(inputs, options, lora)
    from deploy.local.processes import start_child, stop_child

    with tempfile.TemporaryDirectory(prefix="kto-loop-ranks-") as tmp:
        job, outcome, log_path = Path(tmp) / "job.pkl", Path(tmp) / "outcome.pkl", Path(tmp) / "log"
        job.write_bytes(pickle.dumps((replace(inputs, progress=False), options, lora)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(nproc), "-m", "flows.training", str(job), str(outcome)]
        launcher = start_child(command, log_path=log_path)
        try:
            code = launcher.wait()
        finally:
            if launcher.poll() is None:
                stop_child(launcher)
        if outcome.is_file():
            result = pickle.loads(outcome.read_bytes())
            if isinstance(result, BaseException):
                raise result
            return result
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise TrainError(
            f"training on {nproc} processes ended (exit {code}) without a result:\n{tail}"
        )


def join_process_group() -> None:
    """Under torchrun (WORLD_SIZE > 1), join the process group once, at the entry
    point: NCCL on GPUs, gloo on CPUs. The rank dies with its torchrun: a killed
    launcher leaves no rank behind."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from deploy.local.processes import die_with_parent

    die_with_parent(os.getppid(), signal.SIGTERM)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)


def _rank_main(job: Path, outcome: Path) -> int:
    """One rank of `run_training_on`: train, and on rank 0 write the result or the
    run's error for the launching process."""
    from pipeline.training.encode import EncodeError
    from pipeline.training.errors import DivergedError, GeneralAbilityError

    join_process_group()
    inputs, options, lora = pickle.loads(job.read_bytes())
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        result: Any = run_training(inputs, options, lora)
        code = 0
    except (TrainError, EncodeError, DivergedError, GeneralAbilityError) as exc:
        result, code = exc, 1
    if main:
        tmp = outcome.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(result))
        os.replace(tmp, outcome)
    return code


@contextlib.contextmanager
def _process_group(options: TrainOptions) -> Iterator[None]:
    """A one-rank process group for the run when asked to shard (fsdp) outside
    torchrun; under torchrun the entry point has joined the group already."""
    dist = torch.distributed
    if not options.fsdp or dist.is_initialized():
        yield
        return
    backend = (
        "nccl"
        if options.device.startswith("cuda")
        or (options.device == "auto" and torch.cuda.is_available())
        else "gloo"
    )
    with tempfile.TemporaryDirectory(prefix="kto-loop-pg-") as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def runtime_for(options: TrainOptions) -> Runtime:
    """Where this process trains: the configured device, or under torchrun its local
    GPU (else the CPU); bf16 autocast where configured or available; its rank."""
    if options.device != "auto":
        device = torch.device(options.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Runtime(device, autocast_dtype(options, device), rank, world)


def autocast_dtype(options: TrainOptions, device: torch.device) -> torch.dtype | None:
    """bf16 when asked for, or on "auto" with a GPU that has it; else None (fp32)."""
    if options.precision == "fp32":
        return None
    if options.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (the LoRA's initial weights, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def package_versions() -> dict[str, str]:
    """The versions a manifest records: ours, torch, transformers, peft, and the git
    commit ($KTO_LOOP_GIT_COMMIT, else the checkout's HEAD)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kto-loop", "torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    commit = os.environ.get("KTO_LOOP_GIT_COMMIT")
    if commit is None:
        head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
        with contextlib.suppress(OSError):
            ref = head.read_text().strip()
            if ref.startswith("ref: "):
                ref = (head.parent / ref[5:]).read_text().strip()
            commit = ref
    out["git_commit"] = commit or "unknown"
    return out


def _bars() -> Progress:
    from tqdm.auto import tqdm

    return tqdm


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None


if __name__ == "__main__":
    sys.exit(_rank_main(Path(sys.argv[1]), Path(sys.argv[2])))
