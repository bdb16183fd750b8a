//! Tokenizer (tokenizer.json via `tokenizers`) and chat templates.
