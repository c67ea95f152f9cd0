"""The base every model chain builds on: its pack, its device, and run → ChainResult → DICOM."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

from pydicom import Dataset

from pipeline.chains import RuntimeSettings, SeriesInput, StudyInputs
from pipeline.packs import ModelPack, load_pack
from pipeline.results import ChainResult, Provenance
from pipeline.route import ChainSpec

#: options every model chain takes (config.yaml ``chains[].options``), with their defaults
COMMON_OPTIONS: dict[str, Any] = {"parametric_maps": False}  # also encode the maps as Parametric Maps


def select_device(requested: str) -> str:
    """'cpu', 'cuda' (an error without a GPU) or 'auto' (cuda when present)."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("workers.device is cuda but no CUDA device is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


#: the worker's precision for forward passes (RuntimeSettings.precision) and its device type, set by ModelChain
_precision = ("fp32", "cpu")


@contextmanager
def inference_context() -> Iterator[None]:
    """The context every chain runs its networks' forward passes in (not Grad-CAM: it needs gradients).

    ``torch.inference_mode`` (no autograd bookkeeping), plus bf16 autocast when the worker runs
    with ``workers.precision: bf16``. bench/cpu_inference measured these against ``no_grad``,
    channels-last and TorchScript freezing (bench/README.md). Tensors made inside cannot enter
    autograd later, so inputs that Grad-CAM reuses must be built outside.
    """
    import torch

    precision, device_type = _precision
    with torch.inference_mode():
        if precision == "bf16":
            with torch.autocast(device_type, dtype=torch.bfloat16):
                yield
        else:
            yield


#: how forward passes run (RuntimeSettings.runtime), see ``prepared``
RUNTIMES = ("eager", "torchscript", "onednn", "channels_last", "compile", "onnxruntime")
_runtime = "eager"


def set_runtime(runtime: str) -> None:
    """Set the runtime of the networks ``prepared`` builds from now on in this process."""
    global _runtime
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    _runtime = runtime


class PreparedNetwork:
    """A network in eval mode whose forward passes run in the worker's runtime (``set_runtime``).

    Each input shape is prepared once, on its first call (tracing, freezing, compiling or
    exporting takes seconds; windows and crops keep their shapes, so it is paid once per worker):

    * ``eager``: the module itself (the reference);
    * ``torchscript``: traced and frozen (constants folded, conv + batch norm merged);
    * ``onednn``: frozen, then ``torch.jit.optimize_for_inference`` (oneDNN layouts and fusions);
    * ``channels_last``: a copy in channels-last memory format;
    * ``compile``: ``torch.compile`` (inductor; needs a C++ compiler, minutes to compile);
    * ``onnxruntime``: exported to ONNX and run by ONNX Runtime's CPU provider (extra ``onnx``).

    All are fp32; bench/xr_anatomy measures their speed and deviation (bench/README.md). Only
    forward passes: Grad-CAM needs the eager module's gradients.
    """

    def __init__(self, module: Any, runtime: str | None = None) -> None:
        self.module = module.eval()
        self.runtime = runtime or _runtime
        self._prepared: dict[tuple[int, ...], Any] = {}

    def __call__(self, x: Any) -> Any:
        if self.runtime == "eager":
            return self.module(x)
        run = self._prepared.get(tuple(x.shape))
        if run is None:
            run = self._prepared[tuple(x.shape)] = self._prepare(x)
        return run(x)

    def _prepare(self, example: Any) -> Any:
        import copy

        import torch

        if self.runtime in ("torchscript", "onednn"):
            with torch.no_grad():
                traced = torch.jit.trace(self.module, example.detach().clone(), check_trace=False)
                script = torch.jit.optimize_for_inference(traced) if self.runtime == "onednn" else torch.jit.freeze(traced.eval())
            return script
        if self.runtime == "channels_last":
            last = copy.deepcopy(self.module).to(memory_format=torch.channels_last)
            return lambda x: last(x.contiguous(memory_format=torch.channels_last)).contiguous()
        if self.runtime == "compile":
            return torch.compile(self.module)
        return _onnx_session(self.module, example)


def _onnx_session(module: Any, example: Any) -> Any:
    """``module`` exported to ONNX (fixed input shape) and run by ONNX Runtime on the CPU threads torch uses."""
    import io

    import onnxruntime
    import torch

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (example.detach().clone(),), buffer, dynamo=False, opset_version=17, input_names=["x"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(x: Any) -> Any:
        (output, *_) = session.run(None, {"x": x.detach().cpu().numpy()})
        return torch.from_numpy(output)

    return run


def set_precision(precision: str, device: str = "cpu") -> None:
    """Set the precision of ``inference_context`` in this process: "fp32" (default) or "bf16"."""
    global _precision
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    _precision = (precision, "cuda" if device.startswith("cuda") else "cpu")


def _fits(value: object, default: object) -> bool:
    """Whether an option's value has its default's type (an int fits a float; a bool fits only a bool)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def merge_options(
    chain: str, options: Mapping[str, Any], defaults: Mapping[str, Any], minimums: Mapping[str, float]
) -> dict[str, Any]:
    """``options`` over ``defaults``; a ValueError names any unknown option, or one of the wrong type or too small."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"chain {chain}: unknown option(s) {unknown}; known: {sorted(defaults)}")
    settings = {**defaults, **options}
    for key, value in options.items():
        if not _fits(value, defaults[key]):
            raise ValueError(f"chain {chain}: option {key} must be of type {type(defaults[key]).__name__}, got {value!r}")
        if key in minimums and value < minimums[key]:
            raise ValueError(f"chain {chain}: option {key} must be at least {minimums[key]}, got {value!r}")
    return settings


class ModelChain(ABC):
    """A chain with a model pack. Subclasses implement ``build`` and ``run``."""

    #: the chain name packs must declare in their manifest
    chain_name: str
    #: the chain's own options and their defaults (besides COMMON_OPTIONS)
    option_defaults: ClassVar[Mapping[str, Any]] = {}
    #: lower bounds of numeric options
    option_minimums: ClassVar[Mapping[str, float]] = {}

    def __init__(self, spec: ChainSpec, runtime: RuntimeSettings) -> None:
        import torch

        if not spec.pack:
            raise ValueError(f"chain {spec.name} needs a model pack (chains[].pack in config.yaml)")
        self.name = spec.name
        # checked before the weights are loaded: a typo in config.yaml fails fast
        self.settings = merge_options(spec.name, spec.options, {**COMMON_OPTIONS, **self.option_defaults}, self.option_minimums)
        self.pack: ModelPack = load_pack(spec.pack, chain=self.chain_name)
        self.device = select_device(runtime.device)
        torch.set_num_threads(runtime.torch_threads)
        set_precision(runtime.precision, self.device)
        set_runtime(runtime.runtime)
        self.timings: dict[str, float] = {}
        self.build(self.pack.load_state_dict())

    @abstractmethod
    def build(self, state_dict: dict) -> None:
        """Construct the networks from the pack's manifest and load ``state_dict`` strictly."""

    @abstractmethod
    def run(self, inputs: StudyInputs) -> ChainResult:
        """Turn the study's input series into findings, maps and scores."""

    def single_series(self, inputs: StudyInputs, key: str, what: str) -> SeriesInput:
        """The one input series of a single-series chain: the one routed under ``key``, or the
        only series given (a chain run by hand on one series); anything else is a routing error
        that names ``what`` the chain needs."""
        if key in inputs.series:
            return inputs.series[key]
        if len(inputs.series) == 1:
            return next(iter(inputs.series.values()))
        raise ValueError(f"chain {self.name} needs one {what} series (input key {key!r}), got {sorted(inputs.series)}")

    def produce(self, inputs: StudyInputs) -> list[Dataset]:
        from pipeline.encode import encode_result

        self.timings = {}
        result = self.run(inputs)
        with self.timed("encode"):
            return encode_result(result, parametric_maps=self.settings["parametric_maps"], plan=inputs.output)

    def provenance(self, **parameters: object) -> Provenance:
        manifest = self.pack.manifest
        return Provenance(
            chain=self.name,
            pack_name=manifest.name,
            pack_version=manifest.version,
            weights_sha256=manifest.weights.sha256,
            demonstration=manifest.demo,
            device=self.device,
            timings_s=dict(self.timings),
            parameters=dict(parameters),
        )

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = round(self.timings.get(step, 0.0) + time.perf_counter() - start, 4)
