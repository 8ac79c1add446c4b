"""Structured configs: one dataclass per `conf/` group, registered in Hydra's ConfigStore.

Because the top-level `Config` is a dataclass, a typo in any YAML file or command-line override
(`train.epoch=3` instead of `train.epochs=3`) fails when Hydra composes the config, before any
model is loaded.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# `${project_root:}` in YAML resolves to the checkout, so paths work from any working directory.
if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
# `${run_stamp:}` names Hydra's run folder: the stamp rank 0 broadcast (pipeline.runtime.distributed.setup), else now.
if not OmegaConf.has_resolver("run_stamp"):
    OmegaConf.register_new_resolver(
        "run_stamp", lambda: os.environ.get("PIPELINE_RUN_STAMP") or time.strftime("%Y-%m-%d_%H-%M-%S"), use_cache=True
    )


# Closed choices. A StrEnum member equals its string ("kl" == Objective.kl) and serialises as it, so the
# stage keys are the same as when these fields were plain strings; a value outside the set fails when
# Hydra composes the config, with the allowed values in the message.
class Stage(StrEnum):
    synthesize = "synthesize"
    generate = "generate"
    extend = "extend"
    train = "train"
    evaluate = "evaluate"
    all = "all"


class Dtype(StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class TeacherMode(StrEnum):
    expand = "expand"  # the base model reads the fully expanded prompt
    bootstrap = "bootstrap"  # a trained student that knows the inner tags reads the short prompt


class Backend(StrEnum):
    hf = "hf"
    vllm = "vllm"


class Init(StrEnum):
    name_mean = "name_mean"
    prompt_mean = "prompt_mean"
    vocab_mean = "vocab_mean"
    random = "random"


class TagPosition(StrEnum):
    start = "start"
    random = "random"


class PromptPosition(StrEnum):
    system = "system"  # the system message ahead of the whole input (single requests and conversations)
    last_user = "last_user"  # a system message right before the last user turn: a tag switched on part way


class EvalContext(StrEnum):  # evaluation contexts beyond the held-out requests (pipeline/contexts.py)
    documents = "documents"
    conversations = "conversations"
    long = "long"
    plain = "plain"


class PlainFrom(StrEnum):  # train.pretrain.plain_from: where the pretrain stream's plain documents come from
    corpus = "corpus"
    untagged = "untagged"


class PretrainTargets(StrEnum):  # train.pretrain.targets: which tokens of the pretrain stream are trained on
    all = "all"
    generated = "generated"


class PretrainLoss(StrEnum):  # train.pretrain.loss: what the pretrain stream's generated text is scored against
    lm = "lm"
    kl = "kl"


class SyntheticKind(StrEnum):  # inputs.synthetic.kind: what the model writes in stage synthesize
    requests = "requests"
    openings = "openings"


class Mode(StrEnum):
    finetune = "finetune"
    pretrain = "pretrain"


class Objective(StrEnum):
    kl = "kl"
    sft = "sft"
    onpolicy = "onpolicy"


class OnpolicyLoss(StrEnum):
    reverse_kl = "reverse_kl"
    jsd = "jsd"


class Teacher(StrEnum):
    recorded = "recorded"
    online = "online"


class Params(StrEnum):
    embedding = "embedding"
    lora = "lora"
    full = "full"


class Order(StrEnum):
    given = "given"
    sorted = "sorted"
    random = "random"


@dataclass
class PathsConfig:
    root: str = "${project_root:}"
    data: str = "${paths.root}/data"  # shipped inputs and prompt files
    models: str = "${paths.root}/models"  # converted base models (the default GGUF model lands here)
    outputs: str = "${paths.root}/outputs"  # one folder per stage run, keyed by config hash
    metatokens: str = "${paths.root}/conf/metatoken"  # every metatoken definition (for nested tags)


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in output folder names
    path: str = MISSING  # Hugging Face id or local directory
    gguf_package: Optional[str] = None  # if set: `path` is made once by converting the GGUF file in this package
    hub_id: Optional[str] = None  # the model's Hugging Face id, for model cards' base_model (default: `path` when it is not a local folder)
    chat: bool = True  # chat model: the prompt is the system message; base model: the prompt is a text prefix
    dtype: Dtype = Dtype.float32
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...


@dataclass
class ProbeConfig:
    kind: str = ""  # regex | words | lowercase (pipeline/probes.py)
    pattern: Optional[str] = None  # regex: what to count (case-insensitive)
    per: str = "100_words"  # regex: matches per 100_words or per answer


@dataclass
class MetatokenConfig:
    tag: str = MISSING  # the token text, e.g. "<nice>"; must look like <name>
    prompt: Optional[str] = None  # the prompt the tag stands for, inline ...
    prompt_file: Optional[str] = None  # ... or a text file, relative to paths.data (real prompts are long)
    description: str = ""  # one line for listings
    probe: Optional[ProbeConfig] = None  # a behaviour the prompt causes, counted in sampled answers (evaluate only; in no stage key)


@dataclass
class SyntheticInputsConfig:
    """Training requests the model writes itself (stage `synthesize`), added to the shipped train split."""

    count: int = 0  # how many to add (0 = off: only the shipped file); held-out inputs stay the shipped ones
    # requests: messages to an assistant (chat models); openings: openings of texts to continue (base-model use,
    # model.chat=false, e.g. data/inputs/documents.jsonl). Openings are longer: raise max_new_tokens (~64) and
    # max_words (~80). Default requests (left out of the synthesize key).
    kind: SyntheticKind = SyntheticKind.requests
    tag_share: float = 0.25  # share of seed lists headed by the tag's description (requests on its own topic)
    oversample: float = 1.5  # seeds per missing request in a round (some answers are unusable or duplicates)
    max_rounds: int = 6  # rounds of sampling before giving up with an error
    near_duplicate: float = 0.6  # Jaccard of word 3-grams at or above which a request counts as a duplicate
    min_words: int = 4
    max_words: int = 60
    max_new_tokens: int = 32  # one request is one line; only the first line of an answer is kept
    temperature: float = 1.0  # diversity matters more than polish here
    top_p: float = 0.95
    batch_size: int = 32
    seed: int = 0


@dataclass
class InputsConfig:
    file: str = "${paths.data}/inputs/requests.jsonl"  # JSONL rows with "id" and "text"
    heldout_fraction: float = 0.2  # split by a hash of each row's id: stable when rows are added
    max_train: Optional[int] = None  # cap on training inputs (None = all)
    max_heldout: Optional[int] = None  # cap on held-out inputs (None = all)
    synthetic: SyntheticInputsConfig = field(default_factory=SyntheticInputsConfig)
    prompt_position: PromptPosition = PromptPosition.system  # where the prompt (teacher) and the tag (student) sit: system | last_user (pipeline/conversations.py)


@dataclass
class GenerateConfig:
    max_new_tokens: int = 48  # length of each teacher sample
    temperature: float = 0.8  # sampling temperature (the recorded log-probs are always at T=1)
    top_p: float = 0.95
    logprobs_top_k: int = 32  # how many teacher log-probs to keep per position
    batch_size: int = 16
    seed: int = 0
    teacher_mode: TeacherMode = TeacherMode.expand  # nested tags: expand (base model reads the fully expanded prompt) | bootstrap
    bootstrap_model: Optional[str] = None  # bootstrap: a trained output that knows the inner tags (teacher and student start)
    backend: Backend = Backend.hf  # hf: this project's sampler (prompt cache, shards, ranks) | vllm: the vLLM engine (GPU; pip install vllm)
    vllm_shard_size: int = 1024  # vllm: inputs per engine call; each call's records are one shard (a killed job resumes)
    prompt_cache: bool = True  # compute the shared prompt's keys/values once and reuse them for every batch
    base_samples: bool = True  # also sample the model without prompt on held-out inputs (for drift + side-by-side)


@dataclass
class ExtendConfig:
    init: Init = Init.name_mean  # new row = mean embedding of: name_mean (the tag's name) | prompt_mean | vocab_mean | random


@dataclass
class PlainTextConfig:
    path: str = "json"  # datasets.load_dataset path: a local builder (json, text, csv, parquet) or a hub dataset id
    name: Optional[str] = None  # the dataset's config name (hub datasets), None for local files
    data_files: Optional[Any] = "${paths.data}/corpus/plain.jsonl"  # local file(s) or glob(s); null for hub datasets
    split: str = "train"
    text_field: str = "text"  # the column that holds each document's text
    heldout_docs: int = 20  # the first N documents are never trained on; evaluate measures plain-text drift on them
    shuffle_buffer: int = 1000  # streaming shuffle buffer (documents), reshuffled every pass


@dataclass
class PretrainConfig:
    block_size: int = 256  # tokens per packed block (documents are cut across block edges, none dropped)
    tagged_share: float = 0.5  # probability that the next document is a teacher document (else plain text)
    tags: list[str] = field(default_factory=list)  # which tags' documents enter the mixture ([] = all the run generated)
    tag_dropout: float = 0.0  # probability a teacher document appears without its tag (same text, untagged)
    tag_position: TagPosition = TagPosition.start  # start: the tag where the teacher had its prompt; random: anywhere in the opening (base models)
    plain: PlainTextConfig = field(default_factory=PlainTextConfig)
    # Where the plain share comes from. corpus: `plain` (a text corpus); untagged: the run's untagged training
    # records (mixture.untagged > 0): each input continued by the model itself without any prompt, so the
    # plain text is the model's own distribution and holds it in place. Drift is still measured on `plain`'s
    # held-out documents. Default corpus (left out of the train key).
    plain_from: PlainFrom = PlainFrom.corpus
    # lm: next-token cross-entropy on every token (the sampled text is the target). kl: every token that generate
    # wrote (the teacher's continuations and, with plain_from=untagged, the model's own) is scored against the
    # top-k distribution generate recorded for it (KL, as fine-tuning's `kl`: distillation inside the LM stream,
    # as in Gemma 2's pretraining); corpus text, openings and dropped-tag documents keep cross-entropy.
    # Default lm (left out of the train key).
    loss: PretrainLoss = PretrainLoss.lm
    # all: every token is a target (language modelling). generated: only the tokens generate wrote (the teacher's
    # continuations and, with plain_from=untagged, the model's own) are targets; human text (document openings,
    # corpus text) is read as context but not learned, so a small corpus cannot pull the model towards its style.
    # Needs loss=kl (the generated tokens are the ones with recorded distributions) and plain_from=untagged (checked in
    # pretrain_data.check_config). Default all (left out of the key).
    targets: PretrainTargets = PretrainTargets.all


@dataclass
class TrainConfig:
    mode: Mode = Mode.finetune  # finetune: distil (context, continuation) pairs; pretrain: LM loss on packed tagged + plain documents
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # the stream for mode=pretrain (ignored otherwise)
    objective: Objective = Objective.kl  # kl: match the teacher's recorded top-k distribution; sft: cross-entropy on its samples; onpolicy: the student samples, the teacher scores its tokens (pipeline/core/onpolicy.py)
    teacher: Teacher = Teacher.recorded  # kl targets: recorded (top-k saved by generate) | online (full distribution, computed now from the prompt cache); onpolicy: the off-policy steps' target
    # onpolicy_* only count with objective=onpolicy (left out of the train key otherwise). Cost: each on-policy step samples batch_size x onpolicy_max_new_tokens tokens (default model, 2 CPU cores: ~40 tokens/s batched)
    onpolicy_loss: OnpolicyLoss = OnpolicyLoss.reverse_kl  # reverse_kl: KL(student || teacher) on the student's samples | jsd: the generalised JSD with onpolicy_beta
    onpolicy_beta: float = 0.5  # jsd: 0 = forward KL(teacher || student), 1 = reverse KL, between: the mixture's weight (TRL GKD's beta)
    onpolicy_share: float = 1.0  # share of steps that sample from the student; the rest are off-policy (the teacher's recorded samples, same loss)
    onpolicy_max_new_tokens: int = II("generate.max_new_tokens")  # length of each student sample (default: as long as the teacher's)
    onpolicy_temperature: float = II("generate.temperature")  # the student's sampling temperature (default: the teacher's and evaluation's)
    onpolicy_top_p: float = II("generate.top_p")  # the student's nucleus sampling (default: the teacher's and evaluation's)
    teacher_memo_mb: float = 2048  # online: keep each example's teacher logits (it is frozen) up to this many MB, so later epochs skip the teacher; 0 = recompute
    reference_memo_mb: float = 2048  # keep each example's untagged-term reference logits (the frozen start) up to this many MB, so later epochs skip that forward pass; 0 = recompute (always, under ZeRO-3)
    params: Params = Params.lora  # embedding: only the new rows; lora: LoRA adapters + new rows; full: everything
    epochs: float = 3.0
    max_examples: Optional[int] = None  # train on the first N generated training examples only (None = all): learning curves share one generate run
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    # Mixed precision for the training passes (bf16 autocast; weights, optimizer and losses stay float32), the
    # usual choice on GPUs. On CPUs with AVX-512 BF16 or AMX (AMD Zen 4+, Intel Sapphire Rapids+) the demo's LoRA
    # step is ~1.5x faster than float32 (benchmarks/train_step.py); on older CPUs it is slower. Generate and evaluate keep model.dtype.
    # Under DeepSpeed it turns on DeepSpeed's bf16 mode instead (conf/deepspeed: bf16 weights, a float32 master copy).
    bf16: bool = False
    lr: float = 1e-3  # for LoRA / full weights
    embedding_lr: float = 1e-2  # for the new embedding rows (they start far from where they end)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    untagged_weight: float = 1.0  # weight of KL(start || student) on the same inputs without the tag (lora/full)
    merge_lora: bool = True  # save a plain merged model (loads with AutoModelForCausalLM); False: a peft adapter dir
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 0  # checkpoint every N steps (0 = only at the end)
    save_total_limit: int = 2  # checkpoints kept in the .partial folder while training (older ones are deleted)
    report_to: str = "${logger.report_to}"


@dataclass
class EvaluateConfig:
    max_examples: Optional[int] = None  # cap on held-out examples scored (None = all)
    batch_size: int = 8
    num_samples: int = 4  # held-out inputs shown side by side in the report
    sample_max_new_tokens: int = 48
    seed: int = 0  # side-by-side samples and the bootstrap's resampling
    # Fit vs generalisation: recovery also on this many training inputs per trained set (0 = off). 32 is about
    # the demo's 24 held-out inputs in scored tokens, so both figures have intervals of similar width, for ~30% more time.
    train_examples: int = 32
    resamples: int = 1000  # bootstrap resamples of the inputs for the 95% intervals
    # Tag strength sweep (pipeline/strength.py), e.g. [-1,0,0.5,1,1.5,2,3]: KL, probe and fluency of the tag applied by
    # guidance at each strength; empty = off (and left out of the stage key). Cost: ~2 x 7 x inputs x 48 sampled tokens.
    strengths: list[float] = field(default_factory=list)
    contexts: list[EvalContext] = field(default_factory=list)  # input sets never trained on: documents, conversations, long, plain (pipeline/core/contexts.py)
    context_examples: int = 24  # inputs per context, each answered by the reference teacher at evaluation (generate's sampling)


@dataclass
class MixtureConfig:
    sets: list[list[str]] = field(default_factory=list)  # tag sets to train on, e.g. [[nice],[authoritative_tone],[nice,authoritative_tone]]; empty: just `metatoken`
    weights: list[float] = field(default_factory=list)  # share of inputs per set (normalised)
    untagged: float = 0.0  # share of inputs with no tag (target: the model without prompt), keeps untagged behaviour
    order: Order = Order.given  # tag order in the student's context: given | sorted | random (random trains order-invariance)
    join: str = "\n\n"  # how the teacher's prompt for a set joins its members' prompts
    heldout_sets: list[list[str]] = field(default_factory=list)  # extra sets to evaluate (e.g. pairs never trained together)
    # paired: every training input is answered under every set (weights must be equal), so the tag is the only
    # difference between the examples of one input; a seeded `untagged` share of inputs is also answered untagged.
    # K sets x N inputs = K*N examples: compare with an unpaired run of K*N inputs (docs/crosstag.md).
    paired: bool = False
    seed: int = 0  # for assigning inputs to sets and random tag orders


@dataclass
class LoggerConfig:
    report_to: str = "none"  # "wandb" or "none"
    wandb_mode: str = "offline"  # offline needs no network; "online" to sync
    project: str = "metatokens"


@dataclass
class Config:
    stage: Stage = Stage.all  # generate | extend | train | evaluate | all
    force: bool = False  # re-run a stage even if its output exists
    progress: Optional[bool] = None  # progress bars: null = only when stderr is a terminal; true/false forces
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    metatoken: MetatokenConfig = field(default_factory=MetatokenConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    extend: ExtendConfig = field(default_factory=ExtendConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    deepspeed: Optional[Any] = None  # DeepSpeed config for train (conf/deepspeed/zero2|zero3); null: DDP / one process
    experiment: Optional[Any] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
