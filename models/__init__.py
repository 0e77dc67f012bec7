"""tandem.models: Qwen3-VL configs, checkpoint loading, the model, tokenizer, chat template and image preprocessing."""
