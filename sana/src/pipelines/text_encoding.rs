//! Prompt → caption embeddings, as `diffusers/pipelines/sana/pipeline_sana.py` does it
//! (`SanaPipeline.encode_prompt` / `_get_gemma_prompt_embeds`): Gemma's tokenizer
//! (`tokenizer/tokenizer.json`, read with the HF `tokenizers` crate and set up the way
//! transformers' `GemmaTokenizerFast` sets it up) and the Gemma-2 text encoder.
//!
//! The steps, all as diffusers: prompts are lowercased and stripped; the complex human
//! instruction (on by default) is prefixed to each; the batch is tokenized with BOS,
//! truncated and right-padded to `max_sequence_length` (extended by the instruction's
//! length); Gemma-2's last hidden state is taken and BOS plus the last
//! `max_sequence_length - 1` positions are kept. The negative prompt goes through the
//! same path without the instruction and without the selection.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{ModelWrapper, PostProcessor, SplitDelimiterBehavior, TruncationDirection};

use crate::models::modeling_utils::parse_json;
use crate::models::text_encoders::Gemma2Model;
use crate::{Result, SanaError};

/// diffusers' default `max_sequence_length`.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 300;

/// diffusers' default `complex_human_instruction` (`SanaPipeline.__call__`), joined with
/// "\n" and prefixed to every prompt.
pub const COMPLEX_HUMAN_INSTRUCTION: [&str; 8] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
];

/// `SanaVideoPipeline.__call__`'s default `complex_human_instruction`: the image one
/// reworded for motion and time.
pub const VIDEO_COMPLEX_HUMAN_INSTRUCTION: [&str; 8] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for video generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, motion, and temporal relationships to create vivid and dynamic scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat slowly settling into a curled position, peacefully falling asleep on a warm sunny windowsill, with gentle sunlight filtering through surrounding pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps gradually lighting up, a diverse crowd of people in colorful clothing walking past, and a double-decker bus smoothly passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
];

/// The knobs of `SanaPipeline.encode_prompt`, with `SanaPipeline.__call__`'s defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptOptions {
    /// Caption length the transformer sees (diffusers: 300).
    pub max_sequence_length: usize,
    /// Lines joined with "\n" and prefixed to each prompt; `None` or empty: no prefix.
    /// Never applied to the negative prompt.
    pub complex_human_instruction: Option<Vec<String>>,
    pub num_images_per_prompt: usize,
}

impl PromptOptions {
    /// `SanaVideoPipeline`'s defaults: the same, with the video instruction.
    pub fn video() -> Self {
        Self {
            complex_human_instruction: Some(
                VIDEO_COMPLEX_HUMAN_INSTRUCTION
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            ..Self::default()
        }
    }
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self {
            max_sequence_length: DEFAULT_MAX_SEQUENCE_LENGTH,
            complex_human_instruction: Some(
                COMPLEX_HUMAN_INSTRUCTION
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            num_images_per_prompt: 1,
        }
    }
}

/// Caption embeddings for the transformer.
#[derive(Debug)]
pub struct PromptEmbeds {
    /// `[B·num_images_per_prompt, max_sequence_length, hidden_size]` in the encoder's dtype.
    pub embeds: Tensor,
    /// `[B·num_images_per_prompt, max_sequence_length]` int64, 1 = token, 0 = padding.
    pub mask: Tensor,
}

/// What the tokenizer hands the text encoder.
#[derive(Debug)]
pub struct TokenizedPrompts {
    /// `[B, L]` int64.
    pub input_ids: Tensor,
    /// `[B, L]` int64, 1 = token, 0 = padding.
    pub attention_mask: Tensor,
}

/// `text.lower().strip()`: diffusers' `_text_preprocessing` with `clean_caption=False`.
/// Python's `strip()` also removes the ASCII separators U+001C..U+001F, which Rust's
/// `trim()` keeps.
pub fn preprocess_prompt(text: &str) -> String {
    text.to_lowercase()
        .trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
        .to_string()
}

/// A token given in tokenizer_config.json as a string or as an `AddedToken` object.
fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) => m
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Gemma's tokenizer as transformers 5's `GemmaTokenizerFast` builds it from a
/// `tokenizer.json`: the file's BPE vocabulary, merges, added tokens and post-processor,
/// with Gemma's own normalizer (" " → "▁"), pre-tokenizer and BPE flags (byte fallback,
/// fused unknowns) imposed over whatever the file says, as transformers does.
pub struct GemmaTokenizer {
    tokenizer: tokenizers::Tokenizer,
    pad_id: u32,
    /// Tokens the post-processor adds to one sequence (BOS: 1).
    n_special: usize,
    path: PathBuf,
}

impl std::fmt::Debug for GemmaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GemmaTokenizer")
            .field("path", &self.path)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl GemmaTokenizer {
    /// Reads `<dir>/tokenizer.json` and, when present, `<dir>/tokenizer_config.json`
    /// (special tokens, `add_bos_token` / `add_eos_token`, `tokenizer_class`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(SanaError::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer.json (Gemma's, from transformers)",
                ),
            ));
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Map<String, serde_json::Value> = if cfg_path.is_file() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| SanaError::io(&cfg_path, e))?;
            parse_json(&cfg_path, &text)?
        } else {
            Default::default()
        };
        if let Some(class) = cfg.get("tokenizer_class").and_then(|v| v.as_str()) {
            if !class.starts_with("Gemma") {
                return Err(SanaError::config(
                    &cfg_path,
                    "tokenizer_class",
                    format!("is {class:?}; SANA's text encoder needs Gemma's tokenizer (GemmaTokenizer[Fast])"),
                ));
            }
        }
        let special = |key: &str, default: &str| {
            cfg.get(key)
                .and_then(token_string)
                .unwrap_or_else(|| default.into())
        };

        let mut tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            SanaError::config(&path, "", format!("not a readable tokenizers file: {e}"))
        })?;
        let ModelWrapper::BPE(bpe) = tokenizer.get_model() else {
            let kind = match tokenizer.get_model() {
                ModelWrapper::WordPiece(_) => "WordPiece",
                ModelWrapper::WordLevel(_) => "WordLevel",
                ModelWrapper::Unigram(_) => "Unigram",
                ModelWrapper::BPE(_) => "BPE",
            };
            return Err(SanaError::config(
                &path,
                "model.type",
                format!("is {kind}; Gemma's tokenizer is a byte-fallback BPE"),
            ));
        };
        // GemmaTokenizerFast.__init__: BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None).
        let mut bpe: BPE = bpe.clone();
        bpe.fuse_unk = true;
        bpe.byte_fallback = true;
        bpe.dropout = None;
        bpe.continuing_subword_prefix = None;
        bpe.end_of_word_suffix = None;
        bpe.ignore_merges = false;
        bpe.unk_token = Some(special("unk_token", "<unk>"));
        tokenizer.with_model(bpe);
        // Each transformers call sets its own truncation/padding, overriding the file's.
        tokenizer
            .with_truncation(None)
            .map_err(|e| SanaError::config(&path, "truncation", e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer.with_normalizer(Some(Replace::new(" ", "▁").expect("literal pattern")));
        tokenizer.with_pre_tokenizer(Some(
            Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
                .expect("literal pattern"),
        ));

        let id_of = |key: &str, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                SanaError::config(
                    &path,
                    key,
                    format!("the vocabulary has no {token:?}: not a Gemma tokenizer"),
                )
            })
        };
        let pad_token = special("pad_token", "<pad>");
        let pad_id = id_of("pad_token", &pad_token)?;

        // transformers rebuilds the post-processor when add_bos_token/add_eos_token are
        // explicit in tokenizer_config.json, or when the file has none.
        let flag = |key: &str| cfg.get(key).and_then(|v| v.as_bool());
        let (add_bos, add_eos) = (flag("add_bos_token"), flag("add_eos_token"));
        if add_bos.is_some() || add_eos.is_some() || tokenizer.get_post_processor().is_none() {
            // update_post_processor(): "<bos>:0 $A:0 <eos>:0" and the pair variant.
            let (mut single, mut pair, mut specials) = (String::new(), String::new(), Vec::new());
            let bos = special("bos_token", "<bos>");
            let eos = special("eos_token", "<eos>");
            if add_bos.unwrap_or(false) {
                specials.push((bos.clone(), id_of("bos_token", &bos)?));
                single.push_str(&format!("{bos}:0 "));
            }
            single.push_str("$A:0");
            if add_eos.unwrap_or(false) {
                specials.push((eos.clone(), id_of("eos_token", &eos)?));
                single.push_str(&format!(" {eos}:0"));
            }
            pair.push_str(&single);
            if add_bos.unwrap_or(false) {
                pair.push_str(&format!(" {bos}:1"));
            }
            pair.push_str(" $B:1");
            if add_eos.unwrap_or(false) {
                pair.push_str(&format!(" {eos}:1"));
            }
            let bad = |e: String| SanaError::config(&cfg_path, "add_bos_token", e);
            let mut builder = TemplateProcessing::builder();
            builder.try_single(single.as_str()).map_err(bad)?;
            builder.try_pair(pair.as_str()).map_err(bad)?;
            builder.special_tokens(specials);
            let template = builder.build().map_err(|e| bad(e.to_string()))?;
            tokenizer.with_post_processor(Some(template));
        }
        let n_special = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        Ok(Self {
            tokenizer,
            pad_id,
            n_special,
            path,
        })
    }

    pub fn pad_token_id(&self) -> u32 {
        self.pad_id
    }

    /// `tokenizer.encode(text)`: ids, with BOS when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| SanaError::input("prompt", format!("cannot tokenize {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
    /// add_special_tokens=True)` with right padding: truncation keeps the first tokens
    /// (room left for BOS), padding appends the pad id with mask 0.
    pub fn encode_padded(&self, texts: &[String], max_length: usize) -> Result<TokenizedPrompts> {
        if max_length < self.n_special.max(1) {
            return Err(SanaError::input(
                "max_sequence_length",
                format!("{max_length} leaves no room for a token after the special tokens"),
            ));
        }
        let mut ids = Vec::with_capacity(texts.len() * max_length);
        let mut mask = Vec::with_capacity(texts.len() * max_length);
        for text in texts {
            let mut enc = self.tokenizer.encode(text.as_str(), false).map_err(|e| {
                SanaError::input("prompt", format!("cannot tokenize {text:?}: {e}"))
            })?;
            // The tokenizers library truncates before adding special tokens, keeping room for them.
            enc.truncate(max_length - self.n_special, 0, TruncationDirection::Right);
            let enc = self.tokenizer.post_process(enc, None, true).map_err(|e| {
                SanaError::input("prompt", format!("cannot tokenize {text:?}: {e}"))
            })?;
            let n = enc.get_ids().len();
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
            ids.extend(std::iter::repeat_n(self.pad_id as i64, max_length - n));
            mask.extend(std::iter::repeat_n(1i64, n));
            mask.extend(std::iter::repeat_n(0i64, max_length - n));
        }
        let shape = [texts.len() as i64, max_length as i64];
        Ok(TokenizedPrompts {
            input_ids: Tensor::from_slice(&ids).view(shape),
            attention_mask: Tensor::from_slice(&mask).view(shape),
        })
    }
}

/// SANA's text conditioning: Gemma's tokenizer and the Gemma-2 encoder.
#[derive(Debug)]
pub struct SanaTextEncoder {
    pub tokenizer: GemmaTokenizer,
    pub model: Gemma2Model,
}

/// `<pipeline>/<name>/`, or an error naming the missing sub-folder.
/// `<pipeline_dir>/<name>`, or an error naming the missing sub-folder.
pub(crate) fn sub_folder(pipeline_dir: &Path, name: &str) -> Result<PathBuf> {
    let dir = pipeline_dir.join(name);
    if dir.is_dir() {
        return Ok(dir);
    }
    Err(SanaError::io(
        &dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "missing sub-folder `{name}/` of the SANA pipeline directory (transformer/, vae/, \
                 text_encoder/, tokenizer/, scheduler/)"
            ),
        ),
    ))
}

impl SanaTextEncoder {
    /// Loads `<pipeline_dir>/tokenizer/` and `<pipeline_dir>/text_encoder/`.
    pub fn from_pretrained(pipeline_dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let tokenizer_dir = sub_folder(pipeline_dir, "tokenizer")?;
        let text_encoder_dir = sub_folder(pipeline_dir, "text_encoder")?;
        Self::from_dirs(&tokenizer_dir, &text_encoder_dir, device, kind)
    }

    pub fn from_dirs(
        tokenizer_dir: &Path,
        text_encoder_dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let tokenizer = GemmaTokenizer::from_dir(tokenizer_dir)?;
        let model = Gemma2Model::from_pretrained(text_encoder_dir, device, kind)?;
        Ok(Self { tokenizer, model })
    }

    /// The token ids and mask `_get_gemma_prompt_embeds` feeds the encoder: prompts
    /// lowercased and stripped, the instruction prefixed, padded/truncated to
    /// `max_sequence_length` (plus the instruction's tokens minus 2 when it is used).
    pub fn tokenize(
        &self,
        prompts: &[String],
        complex_human_instruction: Option<&[String]>,
        max_sequence_length: usize,
    ) -> Result<TokenizedPrompts> {
        if prompts.is_empty() {
            return Err(SanaError::input(
                "prompts",
                "the prompt list is empty: give at least one prompt",
            ));
        }
        let prompts: Vec<String> = prompts.iter().map(|p| preprocess_prompt(p)).collect();
        match complex_human_instruction.filter(|lines| !lines.is_empty()) {
            None => self.tokenizer.encode_padded(&prompts, max_sequence_length),
            Some(lines) => {
                let chi = lines.join("\n");
                let n_chi = self.tokenizer.encode(&chi, true)?.len();
                // diffusers: len(encode(chi)) + max_sequence_length - 2.
                let max_length = (n_chi + max_sequence_length)
                    .checked_sub(2)
                    .ok_or_else(|| {
                        SanaError::input(
                            "max_sequence_length",
                            "too short for the complex human instruction",
                        )
                    })?;
                let prompts: Vec<String> = prompts.iter().map(|p| format!("{chi}{p}")).collect();
                self.tokenizer.encode_padded(&prompts, max_length)
            }
        }
    }

    /// Last hidden state of the encoder for tokenized prompts, `[B, L, D]`.
    pub fn encode_tokens(&self, tokens: &TokenizedPrompts) -> Result<Tensor> {
        tch::no_grad(|| {
            self.model
                .forward(&tokens.input_ids, Some(&tokens.attention_mask))
        })
    }

    fn check_options(opts: &PromptOptions) -> Result<()> {
        if opts.max_sequence_length == 0 {
            return Err(SanaError::input(
                "max_sequence_length",
                "must be at least 1",
            ));
        }
        if opts.num_images_per_prompt == 0 {
            return Err(SanaError::input(
                "num_images_per_prompt",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// `SanaPipeline.encode_prompt`'s `prompt_embeds` and `prompt_attention_mask`,
    /// repeated for `num_images_per_prompt` so that every sample carries its own
    /// prompt's embeddings and mask (`p0 p0 p1 p1`, `m0 m0 m1 m1`).
    ///
    /// This departs from diffusers 0.42.1, which tiles the mask (`m0 m1 m0 m1`): with
    /// several prompts of different lengths and more than one image each, its images
    /// get another prompt's padding mask. With one prompt, or one image per prompt,
    /// both are the same.
    pub fn encode_prompt(&self, prompts: &[String], opts: &PromptOptions) -> Result<PromptEmbeds> {
        Self::check_options(opts)?;
        let tokens = self.tokenize(
            prompts,
            opts.complex_human_instruction.as_deref(),
            opts.max_sequence_length,
        )?;
        let hidden = self.encode_tokens(&tokens)?;
        // select_index = [0] + list(range(-max_length + 1, 0)), with Python's negative indexing.
        let total = hidden.size()[1];
        let m = opts.max_sequence_length as i64;
        let mut select = vec![0i64];
        for i in (-m + 1)..0 {
            let idx = total + i;
            if idx < 0 {
                return Err(SanaError::input(
                    "max_sequence_length",
                    format!("selecting {m} positions out of {total} tokens"),
                ));
            }
            select.push(idx);
        }
        let index = Tensor::from_slice(&select).to_device(hidden.device());
        let embeds = hidden.index_select(1, &index);
        let mask = tokens
            .attention_mask
            .index_select(1, &index.to_device(Device::Cpu));
        Ok(repeat_for_images(embeds, mask, opts.num_images_per_prompt))
    }

    /// `SanaPipeline.encode_prompt`'s `negative_prompt_embeds` and mask: the negative
    /// prompt(s) without the instruction and without position selection, padded to
    /// `max_sequence_length`. One negative prompt is used for the whole batch (as a
    /// Python `str`); otherwise give one per prompt.
    pub fn encode_negative_prompt(
        &self,
        negative_prompts: &[String],
        batch_size: usize,
        opts: &PromptOptions,
    ) -> Result<PromptEmbeds> {
        Self::check_options(opts)?;
        if batch_size == 0 {
            return Err(SanaError::input(
                "prompts",
                "the prompt list is empty: give at least one prompt",
            ));
        }
        let n = negative_prompts.len();
        if n != 1 && n != batch_size {
            return Err(SanaError::input(
                "negative_prompt",
                format!(
                    "{n} negative prompts for {batch_size} prompts: give one, or one per prompt"
                ),
            ));
        }
        let negatives: Vec<String> = (0..batch_size)
            .map(|i| negative_prompts[if n == 1 { 0 } else { i }].clone())
            .collect();
        let tokens = self.tokenize(&negatives, None, opts.max_sequence_length)?;
        let embeds = self.encode_tokens(&tokens)?;
        Ok(repeat_for_images(
            embeds,
            tokens.attention_mask,
            opts.num_images_per_prompt,
        ))
    }

    /// Both halves of classifier-free guidance, `(negative, positive)`, the order
    /// diffusers concatenates them in.
    pub fn encode_prompt_with_negative(
        &self,
        prompts: &[String],
        negative_prompt: &str,
        opts: &PromptOptions,
    ) -> Result<(PromptEmbeds, PromptEmbeds)> {
        let positive = self.encode_prompt(prompts, opts)?;
        let negative =
            self.encode_negative_prompt(&[negative_prompt.to_string()], prompts.len(), opts)?;
        Ok((negative, positive))
    }
}

/// diffusers' `embeds.repeat(1, n, 1).view(B·n, L, -1)`, and the mask repeated the
/// same way (diffusers' `mask.view(B, -1).repeat(n, 1)` tiles it instead, pairing
/// sample `i` with prompt `i mod B`'s mask; see [`SanaTextEncoder::encode_prompt`]).
fn repeat_for_images(embeds: Tensor, mask: Tensor, n: usize) -> PromptEmbeds {
    let n = n as i64;
    let (b, l, d) = embeds.size3().expect("[B, L, D] embeddings");
    let embeds = embeds.repeat([1, n, 1]).view([b * n, l, d]);
    let mask = mask
        .view([b, 1, -1])
        .repeat([1, n, 1])
        .view([b * n, -1])
        .to_device(embeds.device());
    PromptEmbeds { embeds, mask }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{load_named, max_abs_diff, parity_case};

    #[derive(serde::Deserialize)]
    struct EncodeCase {
        name: String,
        prompts: Vec<String>,
        negative_prompt: String,
        num_images_per_prompt: usize,
        max_sequence_length: usize,
        complex_human_instruction: Option<Vec<String>>,
        do_classifier_free_guidance: bool,
    }

    fn cases(dir: &Path) -> (String, Vec<EncodeCase>) {
        #[derive(serde::Deserialize)]
        struct Case {
            dtype: String,
            encode: Vec<EncodeCase>,
        }
        let case: Case =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        (case.dtype, case.encode)
    }

    fn assert_equal_ints(what: &str, got: &Tensor, expected: &Tensor) {
        assert_eq!(got.size(), expected.size(), "{what}: shape");
        let same = got
            .to_kind(Kind::Int64)
            .eq_tensor(&expected.to_kind(Kind::Int64))
            .all()
            .int64_value(&[]);
        if same != 1 {
            panic!("{what} differ:\n got {got}\n expected {expected}");
        }
    }

    /// Token ids, masks and embeddings of every `encode_prompt` call the reference made.
    fn check(case: &str, kind: Kind, tol: f64) {
        let dir = parity_case(&format!("text_encoder_{case}"));
        let enc = SanaTextEncoder::from_pretrained(&dir, Device::Cpu, kind).unwrap();
        let (dtype, encode) = cases(&dir);
        assert_eq!(
            dtype,
            if kind == Kind::Float {
                "float32"
            } else {
                "bfloat16"
            }
        );
        for c in encode {
            let t = load_named(&dir.join(format!("encode_{}.safetensors", c.name)));
            let opts = PromptOptions {
                max_sequence_length: c.max_sequence_length,
                complex_human_instruction: c.complex_human_instruction.clone(),
                num_images_per_prompt: c.num_images_per_prompt,
            };
            let tokens = enc
                .tokenize(
                    &c.prompts,
                    opts.complex_human_instruction.as_deref(),
                    opts.max_sequence_length,
                )
                .unwrap();
            assert_equal_ints(
                &format!("{}: input ids", c.name),
                &tokens.input_ids,
                &t["prompt_input_ids"],
            );
            assert_equal_ints(
                &format!("{}: tokenizer mask", c.name),
                &tokens.attention_mask,
                &t["prompt_tokenizer_mask"],
            );

            let pos = enc.encode_prompt(&c.prompts, &opts).unwrap();
            assert_equal_ints(
                &format!("{}: prompt mask", c.name),
                &pos.mask,
                &t["prompt_attention_mask"],
            );
            assert_eq!(pos.embeds.kind(), t["prompt_embeds"].kind());
            let err = max_abs_diff(&pos.embeds, &t["prompt_embeds"]);
            eprintln!("{case}/{}: prompt_embeds max abs err {err:.3e}", c.name);
            assert!(
                err <= tol,
                "{case}/{}: prompt_embeds max abs error {err:e} > {tol:e}",
                c.name
            );

            if c.do_classifier_free_guidance {
                let neg_tokens = enc
                    .tokenize(
                        std::slice::from_ref(&c.negative_prompt),
                        None,
                        opts.max_sequence_length,
                    )
                    .unwrap();
                assert_equal_ints(
                    &format!("{}: negative ids", c.name),
                    &neg_tokens.input_ids,
                    &t["negative_input_ids"].get(0).unsqueeze(0),
                );
                let (neg, pos2) = enc
                    .encode_prompt_with_negative(&c.prompts, &c.negative_prompt, &opts)
                    .unwrap();
                assert_eq!(max_abs_diff(&pos.embeds, &pos2.embeds), 0.0);
                assert_equal_ints(
                    &format!("{}: negative mask", c.name),
                    &neg.mask,
                    &t["negative_prompt_attention_mask"],
                );
                let err = max_abs_diff(&neg.embeds, &t["negative_prompt_embeds"]);
                eprintln!(
                    "{case}/{}: negative_prompt_embeds max abs err {err:.3e}",
                    c.name
                );
                assert!(
                    err <= tol,
                    "{case}/{}: negative embeds max abs error {err:e} > {tol:e}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn parity_encode_prompt_fp32() {
        check("fp32", Kind::Float, 1e-4);
    }

    #[test]
    fn parity_encode_prompt_bf16() {
        check("bf16", Kind::BFloat16, 3e-2);
    }

    #[test]
    fn parity_encode_prompt_causal_lm_checkpoint() {
        check("causal_lm", Kind::Float, 1e-4);
    }

    #[test]
    fn default_instruction_matches_the_reference() {
        let dir = parity_case("text_encoder_fp32");
        let (_, encode) = cases(&dir);
        let chi = encode.iter().find(|c| c.name == "chi_default").unwrap();
        assert_eq!(
            chi.complex_human_instruction,
            PromptOptions::default().complex_human_instruction
        );
    }

    #[test]
    fn python_lower_strip() {
        assert_eq!(preprocess_prompt("  A CAT\t\n"), "a cat");
        assert_eq!(preprocess_prompt("\u{1c}ΟΔΟΣ\u{3000}"), "οδος");
        assert_eq!(preprocess_prompt(""), "");
    }

    /// A Gemma-like tokenizer.json small enough to write inline.
    fn write_tokenizer(dir: &Path, model: serde_json::Value) {
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": null,
            "model": model,
        });
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    }

    fn tiny_bpe() -> serde_json::Value {
        serde_json::json!({
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4, "b": 5, "▁": 6, "ab": 7},
            "merges": [["a", "b"]]
        })
    }

    fn tokenizer_err(dir: &Path) -> String {
        let msg = GemmaTokenizer::from_dir(dir).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "one line: {msg}");
        msg
    }

    #[test]
    fn tokenizer_pads_truncates_and_adds_bos() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path(), tiny_bpe());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"add_bos_token": true, "add_eos_token": false}"#,
        )
        .unwrap();
        let tok = GemmaTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.encode("ab a", true).unwrap(), vec![2, 7, 6, 4]);
        let t = tok
            .encode_padded(&["ab a".into(), "".into(), "ab ab ab".into()], 4)
            .unwrap();
        let ids: Vec<i64> = Vec::try_from(t.input_ids.flatten(0, 1)).unwrap();
        assert_eq!(ids, vec![2, 7, 6, 4, 2, 0, 0, 0, 2, 7, 6, 7]);
        let mask: Vec<i64> = Vec::try_from(t.attention_mask.flatten(0, 1)).unwrap();
        assert_eq!(mask, vec![1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1]);
    }

    /// Truncation/padding stored in tokenizer.json do not leak into SANA's calls
    /// (transformers overrides them per call).
    #[test]
    fn tokenizer_json_truncation_and_padding_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path(), tiny_bpe());
        let path = dir.path().join("tokenizer.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["truncation"] = serde_json::json!({"direction": "Left", "max_length": 2, "strategy": "LongestFirst", "stride": 0});
        json["padding"] = serde_json::json!({"strategy": {"Fixed": 9}, "direction": "Left", "pad_to_multiple_of": null,
                                             "pad_id": 3, "pad_type_id": 0, "pad_token": "<unk>"});
        std::fs::write(&path, json.to_string()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"add_bos_token": true}"#,
        )
        .unwrap();
        let tok = GemmaTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.encode("ab a b", true).unwrap(), vec![2, 7, 6, 4, 6, 5]);
        let t = tok.encode_padded(&["ab".into()], 4).unwrap();
        let ids: Vec<i64> = Vec::try_from(t.input_ids.flatten(0, 1)).unwrap();
        assert_eq!(ids, vec![2, 7, 0, 0]);
    }

    #[test]
    fn tokenizer_of_another_kind_is_rejected_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let msg = tokenizer_err(dir.path());
        assert!(msg.contains("tokenizer.json"), "{msg}");

        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let msg = tokenizer_err(dir.path());
        assert!(msg.contains("tokenizer.json"), "{msg}");

        let wordpiece = serde_json::json!({
            "type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0, "[PAD]": 1, "a": 2}
        });
        write_tokenizer(dir.path(), wordpiece);
        let msg = tokenizer_err(dir.path());
        assert!(
            msg.contains("tokenizer.json") && msg.contains("WordPiece"),
            "{msg}"
        );

        let mut no_pad = tiny_bpe();
        no_pad["vocab"].as_object_mut().unwrap().remove("<pad>");
        write_tokenizer(dir.path(), no_pad);
        let msg = tokenizer_err(dir.path());
        assert!(
            msg.contains("tokenizer.json") && msg.contains("<pad>"),
            "{msg}"
        );

        write_tokenizer(dir.path(), tiny_bpe());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"tokenizer_class": "T5TokenizerFast"}"#,
        )
        .unwrap();
        let msg = tokenizer_err(dir.path());
        assert!(
            msg.contains("tokenizer_config.json") && msg.contains("tokenizer_class"),
            "{msg}"
        );
    }

    #[test]
    fn missing_sub_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = SanaTextEncoder::from_pretrained(dir.path(), Device::Cpu, Kind::Float)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer") && err.contains("sub-folder"),
            "{err}"
        );
        std::fs::create_dir(dir.path().join("tokenizer")).unwrap();
        let err = SanaTextEncoder::from_pretrained(dir.path(), Device::Cpu, Kind::Float)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("text_encoder") && err.contains("sub-folder"),
            "{err}"
        );
    }

    fn tiny_encoder() -> (tempfile::TempDir, SanaTextEncoder) {
        let dir = tempfile::tempdir().unwrap();
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).unwrap();
        write_tokenizer(&tok_dir, tiny_bpe());
        std::fs::write(
            tok_dir.join("tokenizer_config.json"),
            r#"{"add_bos_token": true}"#,
        )
        .unwrap();
        let cfg = crate::models::text_encoders::Gemma2Config {
            vocab_size: 8,
            hidden_size: 8,
            intermediate_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: Some(4),
            ..Default::default()
        };
        Gemma2Model::new(cfg, Device::Cpu)
            .unwrap()
            .save_pretrained(&dir.path().join("text_encoder"))
            .unwrap();
        let enc = SanaTextEncoder::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
        (dir, enc)
    }

    #[test]
    fn bad_prompt_inputs_are_errors() {
        let (_dir, enc) = tiny_encoder();
        let opts = PromptOptions {
            max_sequence_length: 6,
            complex_human_instruction: None,
            num_images_per_prompt: 2,
        };
        let err = enc.encode_prompt(&[], &opts).unwrap_err().to_string();
        assert!(err.contains("prompt list is empty"), "{err}");
        let err = enc
            .encode_negative_prompt(&["a".into(), "b".into()], 3, &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("negative_prompt"), "{err}");
        let zero = PromptOptions {
            num_images_per_prompt: 0,
            ..opts.clone()
        };
        assert!(enc.encode_prompt(&["ab".into()], &zero).is_err());

        let ok = enc
            .encode_prompt(&["ab".into(), "a b a".into()], &opts)
            .unwrap();
        assert_eq!(ok.embeds.size(), [4, 6, 8]);
        assert_eq!(ok.mask.size(), [4, 6]);
    }
}
