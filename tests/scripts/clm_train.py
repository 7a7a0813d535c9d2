"""A run_clm-style script nobody on the kaio team would write for kaio: HfArgumentParser, a causal LM
built from a config, train and eval splits, evaluation every few steps. Runs unchanged with or without kaio."""

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int, offset: int) -> None:
        self.count, self.offset = count, offset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        ids = (torch.arange(16) * ((i + self.offset) % 5 + 1)) % 31
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    (args,) = HfArgumentParser((TrainingArguments,)).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(96, 0), eval_dataset=Tokens(24, 1000))
    if args.process_index == 0:
        print({"n_train": 96, "n_eval": 24})  # a script's own dict: printed as it is, not taken for the Trainer's
    trainer.train()
    if args.do_eval:
        trainer.evaluate()
    if args.do_predict:
        trainer.predict(Tokens(8, 2000))


if __name__ == "__main__":
    main()
