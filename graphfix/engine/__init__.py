"""graphfix's generation engine: a static-cache decoder, compiled prefill/decode, sampling, benchmarks.

    from graphfix.engine import from_hf, Generator, SamplingParams

    model = from_hf(hf_model, max_batch_size=4, max_seq_len=2048)   # moves the weights
    gen = Generator(model)                                            # inductor + CUDA graphs on GPU
    gen.warmup(batch_sizes=(1, 4))
    out = gen.generate([[1, 15043]], max_new_tokens=64, sampling=SamplingParams(temperature=0.7, top_p=0.9))

See docs/runtime.md.
"""

from graphfix.engine.compile_cache import CompileCache
from graphfix.engine.generator import GenerationResult, Generator, StreamChunk
from graphfix.engine.llama import DecoderConfig, LlamaDecoder
from graphfix.engine.loading import from_hf, from_meta
from graphfix.engine.meta import MetaStepModel
from graphfix.engine.protocol import StepModel
from graphfix.engine.sampling import SamplingParams

__all__ = [
    "CompileCache",
    "DecoderConfig",
    "GenerationResult",
    "Generator",
    "LlamaDecoder",
    "MetaStepModel",
    "SamplingParams",
    "StepModel",
    "StreamChunk",
    "from_hf",
    "from_meta",
]
