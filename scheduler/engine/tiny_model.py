"""A tiny Llama-architecture model generated locally: real architecture, random weights, no downloads.

Used by the vLLM-CPU backend in tests, CI and the README's main job. Everything is deterministic (fixed seed,
generated corpus), so the model directory is cached under a content hash of the recipe and rebuilt only when the
recipe changes.

    >>> path = ensure_tiny_model()          # ~/.cache/llmsched/models/tiny-llama-<hash> (or $LLMSCHED_CACHE)
    >>> # vllm / transformers can load `path` like any Hugging Face model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the build procedure changes in a way the spec below does not capture.
_RECIPE_VERSION = 1


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """Shape of the generated model. The defaults are the project's standard tiny model."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4  # head_dim 32: the smallest head size vLLM's CPU attention supports
    num_key_value_heads: int = 4
    # Long enough that prefill (and so recompute migration) cost grows visibly with context on CPU; the example
    # configs serve it with a shorter max_model_len to keep tests fast.
    max_position_embeddings: int = 16384
    # NOTE(vllm-backend): larger than HF's 0.02 so logits are peaked enough that greedy argmax is not decided by
    # float rounding differences between vLLM's CPU kernels and HF's eager attention.
    initializer_range: float = 0.1
    seed: int = 0
    corpus_sentences: int = 4000

    def hf_config(self) -> dict[str, object]:
        """The generated ``config.json``'s shape keys (Hugging Face's names): what ``ModelSpec`` compares a config
        without ``model.path`` to before the model is built (config load, ``llmsched chart check``). float32: the
        weights' dtype, and vLLM serves them in it (no config dtype is passed for this model)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "float32",
        }


def default_cache_dir() -> Path:
    """``$LLMSCHED_CACHE`` if set, else ``~/.cache/llmsched``."""
    env = os.environ.get("LLMSCHED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmsched"


def configure_cache_env(cache_dir: Path | None = None, *, offline: bool = True) -> Path:
    """Point vLLM's (and HF's) caches into the llmsched cache unless the user already chose a location.

    Returns the cache directory. Call before creating an engine so nothing is written under ``$HOME`` by default.
    ``offline``: the model is local, so the hub is never asked (``HF_HUB_OFFLINE``, unless set); False for a model
    named by its Hugging Face repo id, which the engine downloads.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    return root


_WORDS = (  # noqa: SIM905 - one readable string
    "the of and to in is was that for it with as on be at by this had not are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three request token model cache block decode prefill engine cluster schedule "
    "latency batch memory queue instance router migrate stream prompt sample greedy server client tensor layer"
).split()
_PUNCT = (".", ".", ".", "!", "?", ",")


def _corpus(n_sentences: int, seed: int) -> list[str]:
    """Deterministic pseudo-English (plus digits and punctuation) to train the byte-level BPE on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        sent = " ".join(words)
        lines.append(sent[0].upper() + sent[1:] + rng.choice(_PUNCT))
    return lines


def _recipe_hash(spec: TinyModelSpec) -> str:
    import tokenizers
    import transformers

    key = {
        "recipe": _RECIPE_VERSION,
        "spec": asdict(spec),
        # A different tokenizers/transformers major can serialize differently; key the cache on them too.
        "tokenizers": tokenizers.__version__.split(".")[0],
        "transformers": transformers.__version__.split(".")[0],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def ensure_tiny_model(cache_dir: Path | None = None, spec: TinyModelSpec | None = None) -> Path:
    """Build the tiny model once and return its directory (a Hugging Face model dir, float32 safetensors).

    Args:
        cache_dir: root of the llmsched cache; default ``$LLMSCHED_CACHE`` or ``~/.cache/llmsched``.
        spec: model shape and seed; default the project's standard tiny model.

    Returns:
        ``<cache_dir>/models/tiny-llama-<hash>``; safe to call concurrently from several processes (the build
        goes to a temporary directory that is renamed into place).
    """
    spec = spec or TinyModelSpec()
    root = configure_cache_env(cache_dir)
    target = root / "models" / f"tiny-llama-{_recipe_hash(spec)}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        _build(tmp, spec)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the model dir is read by other users' engines too
        try:
            tmp.rename(target)
        except OSError:
            # Another process won the race; its build is identical.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(out: Path, spec: TinyModelSpec) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Tokenizer: byte-level BPE, so any text round-trips and every byte has a token.
    specials = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.corpus_sentences, spec.seed), trainer=trainer)
    if tok.get_vocab_size() != spec.vocab_size:
        raise RuntimeError(f"tokenizer trained to {tok.get_vocab_size()} tokens, wanted {spec.vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=spec.max_position_embeddings,
    )
    fast.save_pretrained(out)

    config = LlamaConfig(
        **spec.hf_config(),
        initializer_range=spec.initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    # Fixed seed and a private generator state: building the model must not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    (out / "llmsched_tiny_model.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
