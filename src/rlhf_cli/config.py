"""Stage-config schema (pydantic), YAML loading, presets and `--set a.b=value` overrides.

Resolution order, later wins: schema defaults < the YAML file's top-level keys < the chosen preset
(a partial YAML under `presets:` in the same file) < `--set` overrides < CLI flags (--seed,
--output-dir). Every section forbids unknown keys; the error names the closest valid key.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    n_layer: int = Field(4, ge=1, description="Transformer blocks of the tiny GPT-2.")
    n_embd: int = Field(128, ge=8, description="Hidden width of the tiny GPT-2.")
    n_head: int = Field(4, ge=1, description="Attention heads of the tiny GPT-2.")
    n_positions: int = Field(256, ge=16, description="Maximum sequence length of the tiny GPT-2.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Residual, embedding and attention dropout.")


class LoraSection(Section):
    r: int = Field(0, ge=0, description="LoRA rank (peft); 0: off, a full fine-tune. `--set model.lora.r=8` turns "
                   "it on: the base weights freeze, the reference is the same model with adapters off.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the adapters' output is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or all-linear (every linear "
        "layer but the output head).")


class ModelConfig(Section):
    name_or_path: str = Field(
        "tiny", description="Hub name, local checkpoint directory, or 'tiny' (a GPT-2 built from `tiny`)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype when loading; keep float32 and use train.mixed_precision."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub (only if you trust it).")
    fuse_gelu: bool = Field(True, description="Run GPT-2's gelu_new as PyTorch's fused tanh GELU (the same "
                            "function in one kernel; the saved config is unchanged).")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the 'tiny' model.")
    lora: LoraSection = Field(default_factory=LoraSection, description="Low-rank adapters (peft) instead of a full "
                              "fine-tune.")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = Field(
        None, description="transformers' attention kernel; null: its default (sdpa where the family has it). "
        "flash_attention_2 needs a CUDA GPU and the flash-attn package.")
    load_in_4bit: bool = Field(False, description="QLoRA: base weights in 4-bit NF4 (bitsandbytes, a CUDA GPU), bf16 "
                               "compute, double quantization; needs model.lora.r > 0.")
    load_in_8bit: bool = Field(False, description="Base weights in 8-bit (bitsandbytes, a CUDA GPU); needs "
                               "model.lora.r > 0.")

    @model_validator(mode="after")
    def _quantized_trains_adapters(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit exclude each other; pick one")
        if (self.load_in_4bit or self.load_in_8bit) and not self.lora.r:
            raise ValueError("quantized base weights do not train: model.load_in_4bit / load_in_8bit need LoRA "
                             "(set model.lora.r, e.g. 16)")
        return self


class TokenizerConfig(Section):
    name_or_path: str | None = Field(
        None, description="Tokenizer to load; default: the model's. For 'tiny', one is trained on the data."
    )
    vocab_size: int = Field(2000, ge=300, description="Vocabulary size when a byte-level BPE is trained.")


class SyntheticConfig(Section):
    num_train: int = Field(4000, ge=1, description="Generated training examples.")
    num_eval: int = Field(256, ge=1, description="Generated held-out examples.")
    seed: int = Field(0, description="Generator seed: same seed, same data.")
    label_noise: float = Field(0.1, ge=0, le=0.5, description="Fraction of comparison labels flipped.")
    conversational: bool = Field(False, description="synthetic:tldr as TRL conversational rows (messages; "
                                 "prompt/chosen/rejected messages), rendered by the chat template.")


class DataConfig(Section):
    source: str = Field(
        "synthetic:tldr",
        description="synthetic:tldr | synthetic:hh | a hub dataset name | a local json/jsonl/parquet/csv "
        "file (optionally .gz) or a save_to_disk directory.",
    )
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Training split.")
    eval_split: str | None = Field(
        None, description="Held-out split; default: the 'test'/'valid' split if present, else eval_fraction."
    )
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Held-out share when no eval split exists.")
    format: Literal["auto", "tldr", "comparisons", "hh", "text", "rewarded", "completion", "prompt", "messages"] = Field(
        "auto",
        description="tldr (prompt, label) | comparisons (prompt, chosen, rejected) | hh (chosen/rejected "
        "dialogues; conversational: TRL's implicit-prompt preference) | text (one column trained whole) | rewarded "
        "(prompt, completion, reward: ILQL) | completion (prompt, completion: TRL's prompt-completion) | prompt "
        "(prompts only: PPO) | messages (TRL's conversational language modeling); auto picks from the columns. "
        "Columns holding conversations ([{role, content}, ...]) are rendered by the chat template.",
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat template file (.jinja) for conversational data: supplies or overrides the "
        "tokenizer's, and is saved with the trained tokenizer. Relative to the config file. The tiny model's "
        "default: ChatML.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns to the schema's names, e.g. {prompt: post}."
    )
    system_prompt: str | None = Field(
        None, description="Make prompt / prompt-completion rows conversations that open with this system turn (a "
        "text prompt becomes the user's turn, its completion the assistant's), rendered by the chat template: "
        "an instruct model's prompt, as TRL users build it in a dataset map.")
    max_length: int = Field(256, ge=8, description="Maximum tokens of prompt + completion.")
    max_prompt_length: int = Field(192, ge=4, description="Prompts longer than this are truncated.")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many training examples.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="synthetic:* sizes.")

    @model_validator(mode="after")
    def _prompt_fits(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"data.max_length ({self.max_length}) to leave room for the completion"
            )
        return self


class TrainConfig(Section):
    epochs: float | None = Field(2.0, gt=0, description="Passes over the data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(16, ge=1, description="Examples per micro-batch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (wins over warmup_ratio).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Warmup as a share of total steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    group_by_length: bool = Field(True, description="Batch examples of similar length (less padding).")
    log_interval: int = Field(10, ge=1, description="Log train metrics every N optimizer steps.")


class GenerationConfig(Section):
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per completion.")
    do_sample: bool = Field(True, description="Sample (as PPO rollouts do) rather than greedy decode.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")


class EvalConfig(Section):
    interval: int = Field(0, ge=0, description="Evaluate every N optimizer steps; 0: only at start and end.")
    at_start: bool = Field(True, description="Evaluate the initial model too (the 'before' column).")
    num_samples: int = Field(128, ge=1, description="Held-out prompts generated for ROUGE / gold score.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation call.")
    seed: int = Field(1234, description="Sampling seed of eval generation (same prompts, same noise).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Generation kwargs.")


class CheckpointConfig(Section):
    interval: int = Field(100, ge=0, description="Save a resumable checkpoint every N steps; 0: only at the end.")
    keep_last: int = Field(2, ge=1, description="Intermediate checkpoints kept (older ones deleted).")
    save_best: bool = Field(True, description="Keep best/: the checkpoint of the best eval by the stage's metric "
                            "(sft, dpo: eval/loss; train-rm: eval/accuracy; ppo: eval/reward); false saves disk.")


class LoggingConfig(Section):
    tensorboard: bool = Field(False, description="Also write TensorBoard event files (tb/).")
    wandb: bool = Field(False, description="Also log to Weights & Biases (needs `pip install wandb`).")
    wandb_project: str = Field("rlhf-cli", description="W&B project name.")
    run_name: str | None = Field(None, description="Run name; default: stage-preset-seed-time.")
    print_every: int = Field(10, ge=1, description="Without a terminal (nohup, Slurm, CI): a plain progress line "
                             "every this many steps (step, loss, lr, grad-norm, tokens/s, ETA)...")
    print_every_seconds: float = Field(60.0, gt=0, description="...or after this many seconds, whichever comes first.")


class DistributedConfig(Section):
    num_processes: int = Field(1, ge=1, description="Processes on this machine; above 1, `rlhf` relaunches itself "
                               "under torchrun (DDP; gloo on CPU, NCCL on GPUs), or as that many Ray workers "
                               "(launcher: ray).")
    accelerate_config: str | None = Field(None, description="An accelerate config file: `rlhf` relaunches itself with "
                                          "`accelerate launch --config_file` (multi-GPU, multi-node).")
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON config (ZeRO stage, offload); 'auto' "
                                         "values are filled from the train section.")
    launcher: Literal["torchrun", "accelerate", "ray"] | None = Field(
        None, description="What starts the processes: torchrun (num_processes on this machine), accelerate "
        "(accelerate launch with accelerate_config), ray (num_processes Ray Train workers on a Ray cluster, each "
        "running this same command; with one process it trains here, without Ray). null: accelerate when "
        "accelerate_config is set, else torchrun.")
    ray_address: str | None = Field(None, description="The Ray cluster to join (host:port of its head, or auto); "
                                    "null: RAY_ADDRESS, or a cluster started on this node by `ray start`, "
                                    "as ray.init() finds them, else a local one for this run only.")

    @model_validator(mode="after")
    def _launcher_fits(self):
        # a key the chosen launcher would silently ignore is a mistake: say so before anything starts
        if self.launcher == "accelerate" and not self.accelerate_config:
            raise ValueError("distributed.launcher: accelerate needs distributed.accelerate_config (an accelerate "
                             "launch config file)")
        if self.launcher in ("torchrun", "ray") and self.accelerate_config:
            raise ValueError(f"distributed.launcher: {self.launcher} does not read distributed.accelerate_config; "
                             "set it to null (the processes: distributed.num_processes; ZeRO: "
                             "distributed.deepspeed_config)")
        if self.ray_address and self.launcher != "ray":
            raise ValueError("distributed.ray_address is only read by distributed.launcher: ray; set the launcher "
                             "or drop the address")
        return self


class StageConfig(Section):
    stage: str
    preset: str = Field("tiny", description="Preset applied from the file's `presets:` mapping.")
    seed: int = Field(42, description="Seed of model init, data order and sampling.")
    output_dir: str | None = Field(None, description="Where the checkpoint directory is written.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


class PolicyStageConfig(StageConfig):
    """What every stage that starts from a trained policy shares (dpo, ppo, ilql)."""

    policy: str | None = Field(None, description="Policy to start from (an SFT checkpoint or a hub name); also the "
                               "reference where the method has one. Default: model.name_or_path.")

    @property
    def policy_source(self) -> str:
        return self.policy or self.model.name_or_path


class SFTConfig(StageConfig):
    stage: Literal["sft"] = "sft"


class RewardLossConfig(Section):
    use_margin: bool = Field(False, description="Subtract a per-pair `margin` column (synthetic: the gold gap).")
    center_coef: float = Field(0.0, ge=0, description="Weight of (r_chosen + r_rejected)^2, pulling rewards to 0.")


class PolicyComparisonsConfig(Section):
    samples_per_prompt: int = Field(0, ge=0, description="Synthetic data: train on comparisons of this many "
                                    "completions per prompt sampled from the parent policy (--init-from), every "
                                    "pair of them labelled by the gold scorer (data.synthetic.label_noise flipped, "
                                    "ties dropped), as Stiennon et al. had humans compare their policies' samples; "
                                    "0: the data's reference pairs. The prompts are the data's.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="How they are sampled.")
    batch_size: int = Field(128, ge=1, description="Prompts per generation call.")


class RMConfig(StageConfig):
    stage: Literal["train-rm"] = "train-rm"
    init_from: str | None = Field(
        None, description="Checkpoint the reward model starts from (an SFT policy, an RM, or a hub name); "
        "default: model.name_or_path."
    )
    freeze_fraction: float = Field(0.7, ge=0, le=1, description="Share of bottom transformer blocks frozen.")
    share_prompt: bool = Field(True, description="Run each pair's prompt once and both completions on its cached "
                               "keys/values (same result; ~40% less compute when prompts are long); false: one "
                               "concatenated pass over chosen and rejected.")
    loss: RewardLossConfig = Field(default_factory=RewardLossConfig, description="Pairwise loss options.")
    policy_comparisons: PolicyComparisonsConfig = Field(
        default_factory=PolicyComparisonsConfig, description="Comparisons of the parent policy's own samples.")

    @property
    def init_source(self) -> str:
        return self.init_from or self.model.name_or_path


class DPOLossConfig(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the KL tie to the reference (DPO's beta).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO, IPO or SLiC-hinge loss.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: assumed label-flip rate.")
    rpo_alpha: float = Field(0.0, ge=0, description="Weight of the chosen response's NLL (RPO); 0 disables.")


class DPOConfig(PolicyStageConfig):
    stage: Literal["dpo"] = "dpo"
    loss: DPOLossConfig = Field(default_factory=DPOLossConfig, description="DPO loss options.")
    precompute_ref_logps: bool = Field(
        False, description="Compute the reference log-probs once over the data and cache them (no reference "
        "model in memory during training; about a third less compute per step).")
    ref_cache_dir: str | None = Field(None, description="Where cached reference log-probs live; default "
                                      "~/.cache/rlhf_cli/ref_logps. Keyed by data, tokenizer and reference.")
    disable_dropout: bool = Field(True, description="Turn dropout off in the policy (as TRL does for DPO).")
    share_prompt: bool = Field(True, description="Run each pair's prompt once and both completions on its cached "
                               "keys/values (same result; ~40% less compute when prompts are long); false: one "
                               "concatenated pass over chosen and rejected.")


class RewardSourceConfig(Section):
    """One of several weighted reward sources (exactly one of ckpt, fn, url, classifier)."""

    ckpt: str | None = Field(None, description="Reward-model checkpoint.")
    fn: str | None = Field(None, description="Python reward module:function, e.g. rlhf_cli.rewards.rules:exact_match.")
    url: str | None = Field(None, description="HTTP reward endpoint.")
    classifier: str | None = Field(None, description="A transformers text classifier; reward = P(positive_label).")
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    name: str | None = Field(None, description="Its name in the logs (rollout/reward/NAME); default: the function's "
                             "name, the checkpoint's folder or the URL's host.")


class RewardConfig(Section):
    sources: list[RewardSourceConfig] | None = Field(
        None, description="Several reward sources at once, summed with their weights and logged one by one "
        "(instead of one of ckpt / fn / url / classifier); a reward flag on the command line replaces them.")
    weights: list[float] | None = Field(None, description="TRL's reward_weights: one weight per entry of `sources`, "
                                        "in order (overrides each entry's weight).")
    ckpt: str | None = Field(None, description="Reward-model checkpoint (`rlhf train-rm` output); flag --reward-ckpt.")
    fn: str | None = Field(None, description="Python reward module:function, trlx's reward_fn signature; "
                           "flag --reward-fn.")
    url: str | None = Field(None, description="HTTP reward endpoint (POST prompts/completions); flag --reward-url.")
    protocol: Literal["json", "v2"] = Field(
        "json", description="How `url` is spoken to: json (POST {prompts, completions} -> {rewards}) or v2, the "
        "Open Inference Protocol of Triton, KServe and MLServer (`url` is the server's base address).")
    model_name: str = Field("reward", description="v2: the served model's name (/v2/models/NAME/infer).")
    inputs: Literal["text", "tokens"] = Field(
        "text", description="v2: send the texts (BYTES `prompt`, `completion`) or token ids (INT64 `input_ids`, "
        "`attention_mask`, made with `tokenizer`).")
    output: str = Field("rewards", description="v2: the name of the FP32 output tensor holding the rewards.")
    tokenizer: str | None = Field(None, description="v2 with inputs: tokens: the reward model's tokenizer "
                                  "(a local directory or hub name).")
    max_concurrency: int = Field(4, ge=1, description="v2: batches in flight at once.")
    token_env: str = Field("RLHF_REWARD_TOKEN", description="Environment variable holding the endpoint's bearer token.")
    classifier: str | None = Field(None, description="A transformers text classifier (hub name or directory) "
                                   "scored through a sentiment-analysis pipeline: reward = P(`positive_label`).")
    positive_label: str = Field("POSITIVE", description="The classifier label whose probability is the reward.")
    delta: bool = Field(False, description="Reward = score(completion) - score(the dataset's reference completion), "
                        "as trlx's summarize and HH recipes.")
    batch_size: int = Field(32, ge=1, description="Completions per reward-model forward pass.")
    device: str | None = Field(None, description="Device of the reward model (cpu, cuda:1); default: the policy's.")


class RolloutConfig(Section):
    """The keys of the rollout engine that every online method's section has."""

    stop_sequences: list[str] = Field(default_factory=list, description="Cut a completion at the first of these "
                                      "strings and end it with EOS, e.g. ['Human:'] for dialogues.")
    prompt_words: int = Field(4, ge=1, description="For plain-text data: prompts are the first N words of each text.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Rollout sampling kwargs.")


class PPOMethodConfig(RolloutConfig):
    num_rollouts: int = Field(128, ge=1, description="Rollouts collected per PPO iteration.")
    chunk_size: int = Field(16, ge=1, description="Prompts per generation call while collecting rollouts.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each iteration's rollouts.")
    init_kl_coef: float = Field(0.1, ge=0, description="Initial KL penalty coefficient beta.")
    target: float | None = Field(6.0, gt=0, description="Adaptive KL target (nats per rollout); null: fixed beta.")
    horizon: int = Field(10000, ge=1, description="Adaptive KL horizon, in rollouts.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip around the rollout-time values.")
    vf_coef: float = Field(1.0, ge=0, description="Weight of the value loss.")
    cliprange_reward: float | None = Field(10.0, gt=0, description="Clip the (scaled) scores to +-this; null: no clip.")
    scale_reward: Literal["none", "running", "ref"] = Field(
        "none", description="Divide scores by the running std of all scores, or by the std of the first "
        "iteration's scores (the initial policy's), or not at all.")
    num_layers_unfrozen: int = Field(-1, ge=-1, description="Train only the top N transformer blocks (and the "
                                     "final norm and value head); the reference then shares the frozen trunk. "
                                     "-1: train every layer (the reference is a full frozen copy).")

    @property
    def passes(self) -> int:  # passes over an iteration's rollouts (the rollout engine's name for it)
        return self.ppo_epochs


class OnlineStageConfig(PolicyStageConfig):
    """What the online-RL stages share beside their method section (whose keys `online` returns)."""

    init_sft_steps: int = Field(0, ge=0, description="When the policy is 'tiny', first train it with this many SFT "
                                "steps on the data's text (the stand-in for a pretrained LM such as gpt2-imdb).")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Where rewards come from.")


class PPOConfig(OnlineStageConfig):
    stage: Literal["ppo"] = "ppo"
    ppo: PPOMethodConfig = Field(default_factory=PPOMethodConfig, description="PPO hyper-parameters (trlx names).")

    @property
    def online(self) -> PPOMethodConfig:  # what the shared rollout engine reads
        return self.ppo


class GRPOMethodConfig(RolloutConfig):
    num_generations: int = Field(8, ge=1, description="Completions per prompt (G); advantages are relative to the group.")
    num_rollouts: int = Field(128, ge=1, description="Completions per iteration over all processes (prompts x G).")
    chunk_size: int = Field(4, ge=1, description="Prompts per generation call (each sampled G times).")
    num_iterations: int = Field(1, ge=1, description="Passes over each iteration's completions (TRL's mu).")
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = Field(
        "grpo", description="grpo: (r - group mean) / group std; rloo: leave-one-out baseline; reinforce_pp: "
        "group mean subtracted, then whitened over the batch (REINFORCE++ baseline).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo advantages: divide by the group's std, the batch's, or not at all (Dr. GRPO).")
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field(
        "dapo", description="grpo: mean of per-completion token means; bnpo / dapo: token mean over the step's "
        "batch; dr_grpo: token sum / (completions x max_new_tokens).")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clip epsilon of the importance ratio (lower side).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip epsilon (DAPO's clip-higher, e.g. 0.28); "
                                       "null: epsilon.")
    importance: Literal["token", "sequence"] = Field("token", description="Importance ratio per token, or per "
                                                     "completion (GSPO: exp of the mean log-ratio).")
    beta: float = Field(0.0, ge=0, description="Weight of the k3 KL to the reference in the loss; 0: no reference "
                        "model is loaded (eval then reports no KL).")
    mask_truncated_completions: bool = Field(False, description="Completions that reach max_new_tokens without EOS "
                                             "add nothing to the loss (DAPO's overlong filtering).")

    @property
    def passes(self) -> int:
        return self.num_iterations


class GRPOConfig(OnlineStageConfig):
    stage: Literal["grpo"] = "grpo"
    grpo: GRPOMethodConfig = Field(default_factory=GRPOMethodConfig, description="GRPO-family hyper-parameters "
                                   "(TRL's names).")

    @property
    def online(self) -> GRPOMethodConfig:
        return self.grpo


class ILQLMethodConfig(Section):
    tau: float = Field(0.7, gt=0, lt=1, description="Expectile of the V loss.")
    gamma: float = Field(0.99, ge=0, le=1, description="Discount.")
    cql_scale: float = Field(0.1, ge=0, description="Weight of the CQL term.")
    awac_scale: float = Field(1.0, ge=0, description="Weight of the advantage-weighted LM term.")
    alpha: float = Field(0.001, gt=0, le=1, description="Polyak rate of the target Q heads.")
    beta: float = Field(0.0, ge=0, description="AWAC temperature: LM-term weight exp(beta * (Q - V)).")
    steps_for_target_q_sync: int = Field(1, ge=1, description="Polyak-update the target Q heads every N optimizer steps.")
    two_qs: bool = Field(True, description="Two Q heads (double Q); targets use their minimum.")
    rewards: Literal["labels", "gold"] = Field(
        "labels", description="Pairs become samples rewarded +1 (chosen) / -1 (rejected), or, on synthetic data, "
        "by their gold score. (prompt, completion, reward) files use their reward column.")
    gen_betas: list[float] = Field(default_factory=lambda: [0.0, 1.0, 4.0], description="Eval sweep of the "
                                   "steering strength: logits + beta * (Q - V).")
    gen_top_k: int = Field(20, ge=0, description="Top-k of steered sampling; 0 disables.")


class ILQLConfig(PolicyStageConfig):
    stage: Literal["ilql"] = "ilql"
    ilql: ILQLMethodConfig = Field(default_factory=ILQLMethodConfig, description="ILQL hyper-parameters (trlx names).")


CONFIGS: dict[str, type[StageConfig]] = {"sft": SFTConfig, "train-rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig,
                                         "ilql": ILQLConfig, "grpo": GRPOConfig}
LEGACY_NAMES = {"rm": "train-rm"}  # `stage: rm` in configs written before the stage had one name


def keys(stage: str) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every key of `stage`'s config: `rlhf config show`."""
    import typing

    if stage not in CONFIGS:
        raise UserError(f"unknown stage '{stage}'; choose one of {', '.join(CONFIGS)}")

    def type_name(ann) -> str:
        if typing.get_origin(ann) is typing.Union:  # Literal[...] | None: typing spells it Optional[...]
            return " | ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(ann))
        text = getattr(ann, "__name__", None) if typing.get_origin(ann) is None else None
        return text or str(ann).replace("typing.", "").replace("NoneType", "None")

    def walk(model: type[BaseModel], prefix: str):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, f"{prefix}{name}.")
            else:
                default = f.get_default(call_default_factory=True)
                yield f"{prefix}{name}", type_name(ann), json.dumps(default, default=str), f.description or ""
    return list(walk(CONFIGS[stage], ""))


# --- loading -------------------------------------------------------------------------------------
# the recipes ship inside the package: `--config tldr_sft.yaml` works from any directory
RECIPES = Path(__file__).parent / "stage_configs"
# config keys holding a file path: a relative one in a config file is read relative to that file
PATH_KEYS = (("distributed", "accelerate_config"), ("distributed", "deepspeed_config"), ("data", "chat_template"))


def find_config(path: str | Path) -> Path:
    """`path` when it exists, else the packaged recipe of that name (`tldr_sft.yaml`,
    `stage_configs/tldr_sft.yaml`), else `path` (reading it then says it does not exist)."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    for candidate in (RECIPES / path, RECIPES / path.name):
        if candidate.is_file() and candidate.suffix in (".yaml", ".yml"):
            return candidate
    return path


def default_recipe(stage: str) -> str:
    """The packaged recipe a stage runs when no --config is given: the TL;DR summarisation one."""
    return {"train-rm": "tldr_rm.yaml"}.get(stage, f"tldr_{stage}.yaml")


def recipes() -> list[str]:
    return sorted(p.name for p in RECIPES.glob("*.yaml"))


def _relative_to_file(tree: dict, folder: Path) -> dict:
    """File paths of a config file (and its presets) resolved against the file's folder, when they exist there
    and not from the current directory."""
    for section, key in PATH_KEYS:
        value = (tree.get(section) or {}).get(key) if isinstance(tree.get(section), dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists() \
                and (folder / value).exists():
            tree[section][key] = str((folder / value).resolve())
    return tree


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"config file {path} does not exist (packaged recipes: {', '.join(recipes())})")
    if not path.is_file():
        raise UserError(f"config file {path} is not a regular file; give a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict:
    """'train.learning_rate=1e-4' -> {'train': {'learning_rate': 1e-4}} (the value is read as YAML)."""
    if "=" not in item:
        raise UserError(f"--set expects key=value (e.g. train.learning_rate=1e-4), got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)  # YAML 1.1 reads "1e-4" as a string
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def nested(dotted: str, value) -> dict:
    """'a.b', v -> {'a': {'b': v}}."""
    if not dotted or any(not part for part in dotted.split(".")):
        raise UserError(f"override key {dotted!r} has an empty part")
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the section reached by `loc` (used for did-you-mean)."""
    cls: Any = model
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def _has(tree: dict, loc: tuple) -> bool:
    for part in loc:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _describe(err: dict, model: type[BaseModel], source: str, layers: tuple = ()) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    # blame the layer the key came from: the last (--set, then the preset) that holds it, else the file
    source = next((name for name, tree in reversed(layers) if _has(tree, loc)), source)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else (
            f"; valid keys here: {', '.join(valid)}" if valid else "")
        return f"unknown key '{dotted}' in {source}{hint}"
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    msg = err["msg"]
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return f"'{dotted}' in {source}: {msg[0].lower() + msg[1:]}{got_s}"


def validate(raw: dict, source: str, layers: tuple = ()) -> StageConfig:
    """Validate a fully merged dict; raise UserError with one sentence on the first problem.
    `layers`: (name, dict) pairs merged over the file, in order, to name where a bad key came from."""
    stage = raw.get("stage")
    if stage not in CONFIGS:
        raise UserError(f"{source} must set 'stage' to one of {', '.join(CONFIGS)} (got {stage!r})")
    model = CONFIGS[stage]
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        first = _describe(errors[0], model, source, layers)
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise UserError(first + more) from None


def load_config(
    path: str | Path | None,
    stage: str,
    overrides: list[str] | dict = (),
    preset: str | None = None,
) -> StageConfig:
    """Read a stage config, apply its preset and overrides, and validate it.

    `overrides`: `--set` strings ("train.learning_rate=1e-4", the value read as YAML), or a mapping of
    dotted keys to values ({"train.learning_rate": 1e-4}, the Python API's).
    """
    stage = LEGACY_NAMES.get(stage, stage)
    path = find_config(path) if path else None
    raw: dict = _relative_to_file(_read_yaml(path), path.parent) if path else {}
    source = str(path) if path else "the defaults"
    raw.setdefault("stage", stage)
    raw["stage"] = LEGACY_NAMES.get(raw["stage"], raw["stage"])
    if raw["stage"] != stage:
        raise UserError(f"{source} is a '{raw['stage']}' config, but this is `rlhf {stage}`")
    presets = raw.pop("presets", None) or {}
    if not isinstance(presets, dict):
        raise UserError(f"'presets' in {source} must map preset names to partial configs")
    cli: dict = {}
    for item in overrides:
        cli = deep_merge(cli, nested(item, overrides[item]) if isinstance(overrides, dict) else parse_override(item))
    name = preset or cli.get("preset") or raw.get("preset") or "tiny"
    if name not in presets and name != "tiny":
        have = ", ".join(["tiny", *[p for p in presets if p != "tiny"]])
        raise UserError(f"preset '{name}' is not defined in {source}; available: {have}")
    if path and isinstance(presets.get(name), dict):
        presets[name] = _relative_to_file(presets[name], path.parent)
    merged = deep_merge(raw, presets.get(name) or {})
    merged = deep_merge(merged, cli)
    merged["preset"] = name
    setting = "overrides" if isinstance(overrides, dict) else "--set"  # the Python API's, or the CLI's
    return validate(merged, source, ((f"preset '{name}' of {source}", presets.get(name) or {}), (setting, cli)))


def to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def resolve(stage: str, config: str | Path | None = None, overrides: list[str] | dict | None = None,
            preset: str | None = None, seed: int | None = None,
            output_dir: str | Path | None = None) -> tuple[StageConfig, Path]:
    """The stage's validated config (file < preset < overrides < seed / output_dir) and its output directory."""
    if stage not in CONFIGS:
        raise UserError(f"unknown stage '{stage}'; stages: {', '.join(CONFIGS)}")
    cfg = load_config(config, stage, overrides or [], preset)
    if seed is not None:
        cfg.seed = seed
    # runs/<stage> by default; the reward model's is runs/rm, the name every later command expects
    default = Path("runs") / {"train-rm": "rm"}.get(stage, stage)
    dest = Path(output_dir) if output_dir else (Path(cfg.output_dir) if cfg.output_dir else default)
    cfg.output_dir = str(dest)
    return cfg, dest
