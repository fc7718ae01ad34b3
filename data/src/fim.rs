//! Fill-in-the-middle formats as data: each family's sentinel tokens, the order its templates
//! put prefix and suffix in (PSM, and SPM where the family defines it), what ends the middle,
//! and how it lays out other files of the repository. One table serves detection (from a
//! vocabulary's special tokens), rendering (as segments: sentinels stay special tokens, user
//! text is never parsed for them) and parsing a prompt a client already rendered in any
//! family's format back into prefix, suffix and files, so it can be rendered in the served
//! model's own.

use std::fmt;

/// A fill-in-the-middle format, named as `--fim_format` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FimFormat {
    Qwen,
    StarCoder,
    DeepSeek,
    CodeLlama,
    CodeGen2,
}

/// One piece of a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// A sentinel: one special token.
    Token(&'static str),
    /// Fixed text between pieces (CodeLlama's spaces).
    Text(&'static str),
    Prefix,
    Suffix,
}

/// Which of the two arrangements of a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Prefix, suffix, middle: what editors send and every family defines.
    Psm,
    /// Suffix, prefix, middle: the second arrangement of BigCode's and Code Llama's training.
    Spm,
}

/// How a family lays out other files of the repository before the file being completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepoLayout {
    pub repo_name: &'static str,
    pub file_sep: &'static str,
    /// Text after the repository's name (Qwen: a newline).
    pub after_name: &'static str,
    /// Text after each file's code (Qwen: a newline).
    pub after_code: &'static str,
    /// Whether the current file's path opens the prefix (StarCoder2: `<fim_prefix>{path}\n`)
    /// rather than following a last file separator (Qwen: `<|file_sep|>{path}\n<|fim_prefix|>`).
    pub path_in_prefix: bool,
}

/// One family's format.
#[derive(Clone, Copy, Debug)]
pub struct FormatSpec {
    pub format: FimFormat,
    /// The `--fim_format` name.
    pub name: &'static str,
    /// Who uses it, for people (README, errors, the server's model info).
    pub models: &'static str,
    pub psm: &'static [Piece],
    pub spm: Option<&'static [Piece]>,
    /// Tokens that end the middle.
    pub end: &'static [&'static str],
    pub repo: Option<RepoLayout>,
    /// What the vocabulary may put before each sentinel's spelling (HF's Code Llama tokenizer
    /// holds `▁<PRE>`).
    pub vocab_prefix: &'static str,
}

use Piece::{Prefix, Suffix, Text, Token};

/// The formats, in detection order (a vocabulary holding two families' sentinels gets the first).
pub const FORMATS: &[FormatSpec] = &[
    FormatSpec {
        format: FimFormat::Qwen,
        name: "qwen",
        models: "Qwen2.5-Coder (also CodeGemma's sentinels)",
        psm: &[Token("<|fim_prefix|>"), Prefix, Token("<|fim_suffix|>"), Suffix, Token("<|fim_middle|>")],
        spm: None,
        end: &["<|endoftext|>", "<|fim_pad|>"],
        repo: Some(RepoLayout {
            repo_name: "<|repo_name|>",
            file_sep: "<|file_sep|>",
            after_name: "\n",
            after_code: "\n",
            path_in_prefix: false,
        }),
        vocab_prefix: "",
    },
    FormatSpec {
        format: FimFormat::StarCoder,
        name: "starcoder",
        models: "StarCoder, StarCoder2, SantaCoder",
        psm: &[Token("<fim_prefix>"), Prefix, Token("<fim_suffix>"), Suffix, Token("<fim_middle>")],
        spm: Some(&[Token("<fim_prefix>"), Token("<fim_suffix>"), Suffix, Token("<fim_middle>"), Prefix]),
        end: &["<|endoftext|>"],
        repo: Some(RepoLayout { repo_name: "<repo_name>", file_sep: "<file_sep>", after_name: "", after_code: "", path_in_prefix: true }),
        vocab_prefix: "",
    },
    FormatSpec {
        format: FimFormat::DeepSeek,
        name: "deepseek",
        models: "DeepSeek-Coder",
        psm: &[Token("<｜fim▁begin｜>"), Prefix, Token("<｜fim▁hole｜>"), Suffix, Token("<｜fim▁end｜>")],
        spm: None,
        end: &["<｜end▁of▁sentence｜>", "<|EOT|>"],
        repo: None,
        vocab_prefix: "",
    },
    FormatSpec {
        format: FimFormat::CodeLlama,
        name: "codellama",
        models: "Code Llama 7B/13B",
        psm: &[Token("<PRE>"), Text(" "), Prefix, Text(" "), Token("<SUF>"), Suffix, Text(" "), Token("<MID>")],
        spm: Some(&[Token("<PRE>"), Text(" "), Token("<SUF>"), Suffix, Text(" "), Token("<MID>"), Text(" "), Prefix]),
        end: &["<EOT>"],
        repo: None,
        vocab_prefix: "▁",
    },
    FormatSpec {
        format: FimFormat::CodeGen2,
        name: "codegen2",
        models: "CodeGen2, CodeGen2.5",
        psm: &[Prefix, Token("<mask_1>"), Suffix, Token("<|endoftext|>"), Token("<sep>"), Token("<mask_1>")],
        spm: None,
        end: &["<eom>"],
        repo: None,
        vocab_prefix: "",
    },
];

/// The names `--fim_format` takes, for errors and help.
pub fn format_names() -> Vec<&'static str> {
    FORMATS.iter().map(|s| s.name).collect()
}

impl FimFormat {
    pub fn spec(self) -> &'static FormatSpec {
        FORMATS.iter().find(|s| s.format == self).expect("every format has a table row")
    }

    /// The format named `name` (`--fim_format`).
    pub fn from_name(name: &str) -> Result<Self, UnknownFimFormat> {
        FORMATS.iter().find(|s| s.name == name).map(|s| s.format).ok_or_else(|| UnknownFimFormat(name.to_string()))
    }

    /// The first format whose sentinels the vocabulary holds, as `is_special` says of each
    /// spelling; None for a model that cannot infill (served prefix-only).
    pub fn detect(is_special: impl Fn(&str) -> bool) -> Option<Self> {
        FORMATS
            .iter()
            .find(|spec| spec.sentinels().iter().all(|t| is_special(t) || is_special(&format!("{}{t}", spec.vocab_prefix))))
            .map(|s| s.format)
    }
}

impl fmt::Display for FimFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.spec().name)
    }
}

/// A `--fim_format` value that names no format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--fim_format {given:?} is not a FIM format: use one of {known}", given = .0, known = format_names().join(", "))]
pub struct UnknownFimFormat(pub String);

impl FormatSpec {
    /// The PSM template's sentinels, in order, each once.
    pub fn sentinels(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = vec![];
        for piece in self.psm {
            if let Token(t) = piece {
                if !out.contains(t) {
                    out.push(t);
                }
            }
        }
        out
    }

    /// Strings a completion stops at: the end tokens, then every sentinel of the format.
    pub fn stops(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = self.end.to_vec();
        out.extend(self.sentinels());
        out.extend(self.repo.iter().flat_map(|r| [r.repo_name, r.file_sep]));
        out.dedup();
        out
    }

    fn template(&self, order: Order) -> &'static [Piece] {
        match order {
            Order::Spm => self.spm.unwrap_or(self.psm),
            Order::Psm => self.psm,
        }
    }
}

/// Another file of the repository, given as context.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileChunk {
    pub path: String,
    pub text: String,
}

/// What a fill-in-the-middle request asks for, whatever format it came in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Infill {
    pub prefix: String,
    pub suffix: String,
    /// The repository's name, where files are given.
    pub repo: Option<String>,
    /// Other files, placed before the current one.
    pub files: Vec<FileChunk>,
    /// The current file's path.
    pub path: Option<String>,
}

/// A rendered prompt: special tokens by spelling, and text to encode without looking for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Special(&'static str),
    Text(String),
}

/// The prompt as one string, as a client sends a rendered one.
pub fn to_text(segments: &[Segment]) -> String {
    segments
        .iter()
        .map(|s| match s {
            Segment::Special(t) => t,
            Segment::Text(t) => t.as_str(),
        })
        .collect()
}

/// Renders `infill` in `format`, in `order` (a format without SPM renders PSM). Files come first:
/// in the family's repository layout, or, for a family without one, each as llama.cpp's
/// `--- snippet ---` text.
pub fn render(format: FimFormat, order: Order, infill: &Infill) -> Vec<Segment> {
    let spec = format.spec();
    let mut out = vec![];
    let text = |out: &mut Vec<Segment>, t: &str| {
        if !t.is_empty() {
            out.push(Segment::Text(t.to_string()));
        }
    };
    let repo = spec.repo.filter(|_| infill.repo.is_some() || !infill.files.is_empty());
    let mut prefix = infill.prefix.clone();
    match repo {
        Some(layout) => {
            out.push(Segment::Special(layout.repo_name));
            text(&mut out, &format!("{}{}", infill.repo.as_deref().unwrap_or(""), layout.after_name));
            for file in &infill.files {
                out.push(Segment::Special(layout.file_sep));
                text(&mut out, &format!("{}\n{}{}", file.path, file.text, layout.after_code));
            }
            let path = infill.path.as_deref().unwrap_or("");
            out.push(Segment::Special(layout.file_sep));
            if layout.path_in_prefix {
                prefix = format!("{path}\n{prefix}");
            } else {
                text(&mut out, &format!("{path}\n"));
            }
        }
        None => {
            for file in &infill.files {
                text(&mut out, &format!("\n\n--- snippet ---\n\n{}", file.text));
            }
        }
    }
    for piece in spec.template(order) {
        match piece {
            Token(t) => out.push(Segment::Special(t)),
            Text(t) => text(&mut out, t),
            Prefix => text(&mut out, &prefix),
            Suffix => text(&mut out, &infill.suffix),
        }
    }
    out
}

/// A prompt that a client rendered in some family's format, parsed back: the format, the order
/// and what it asks for. None for a plain prompt (no family's sentinels in template order).
pub fn parse(prompt: &str) -> Option<(FimFormat, Order, Infill)> {
    for spec in FORMATS {
        for order in [Order::Psm, Order::Spm] {
            if order == Order::Spm && spec.spm.is_none() {
                continue;
            }
            if let Some(infill) = parse_as(spec, spec.template(order), prompt) {
                return Some((spec.format, order, infill));
            }
        }
    }
    None
}

/// Matches `prompt` against `template`: its sentinels in order, and between them the variable
/// pieces, whose fixed text is stripped. The text before the first sentinel is CodeGen2's prefix,
/// or else the repository's files.
fn parse_as(spec: &FormatSpec, template: &[Piece], prompt: &str) -> Option<Infill> {
    // gaps[k]: the prompt's text after the k-th sentinel (gaps[0]: before the first).
    let mut gaps = vec![];
    // groups[k]: the template's pieces there.
    let mut groups: Vec<Vec<Piece>> = vec![vec![]];
    let mut rest = prompt;
    for piece in template {
        match piece {
            Token(t) => {
                let at = rest.find(t)?;
                gaps.push(&rest[..at]);
                rest = &rest[at + t.len()..];
                groups.push(vec![]);
            }
            p => groups.last_mut().expect("one group per gap").push(*p),
        }
    }
    gaps.push(rest);
    let mut infill = Infill::default();
    for (k, (gap, group)) in gaps.iter().zip(&groups).enumerate() {
        if k == 0 && group.is_empty() {
            continue; // the files, read once the prefix is known
        }
        let slot = group.iter().position(|p| matches!(p, Prefix | Suffix));
        let mut text = *gap;
        for (i, piece) in group.iter().enumerate() {
            if let Text(t) = piece {
                text = if slot.is_none_or(|s| i < s) { text.strip_prefix(t) } else { text.strip_suffix(t) }.unwrap_or(text);
            }
        }
        match slot.map(|s| group[s]) {
            Some(Prefix) => infill.prefix = text.to_string(),
            Some(Suffix) => infill.suffix = text.to_string(),
            _ if !text.is_empty() => return None,
            _ => {}
        }
    }
    if groups[0].is_empty() {
        parse_files(spec, gaps[0], &mut infill)?;
    }
    Some(infill)
}

/// The text before the first sentinel: the repository's files in the family's layout, snippets,
/// or nothing.
fn parse_files(spec: &FormatSpec, head: &str, infill: &mut Infill) -> Option<()> {
    let layout = match spec.repo {
        Some(layout) if head.starts_with(layout.repo_name) => layout,
        _ => {
            for snippet in head.split("\n\n--- snippet ---\n\n").skip(1) {
                infill.files.push(FileChunk { path: String::new(), text: snippet.to_string() });
            }
            return (head.is_empty() || !infill.files.is_empty()).then_some(());
        }
    };
    let mut parts = head[layout.repo_name.len()..].split(layout.file_sep);
    let name = parts.next()?;
    infill.repo = Some(name.strip_suffix(layout.after_name).unwrap_or(name).to_string());
    let parts: Vec<&str> = parts.collect();
    let (last, files) = parts.split_last()?;
    for part in files {
        let (path, text) = part.split_once('\n')?;
        let text = text.strip_suffix(layout.after_code).unwrap_or(text);
        infill.files.push(FileChunk { path: path.to_string(), text: text.to_string() });
    }
    if layout.path_in_prefix {
        if !last.is_empty() {
            return None;
        }
        let (path, prefix) = infill.prefix.split_once('\n')?;
        infill.path = Some(path.to_string());
        infill.prefix = prefix.to_string();
    } else {
        infill.path = Some(last.strip_suffix('\n').unwrap_or(last).to_string());
    }
    Some(())
}

/// Turns rendered prompts into token ids with one tokenizer: each sentinel is its token, and the
/// text between is encoded with special tokens split as text (HF's `split_special_tokens`,
/// llama.cpp's `parse_special=false`), so code that spells a sentinel cannot inject one. The
/// ids HF's `tokenizer(text)` puts first (DeepSeek-Coder's BOS) open the prompt once.
pub struct FimEncoder {
    pub format: FimFormat,
    /// The tokenizer, encoding special tokens' spellings as text.
    text: tokenizers::Tokenizer,
    sentinels: Vec<(&'static str, u32)>,
    start: Vec<u32>,
}

/// A sentinel the rendering used that the tokenizer lacks (a format set by hand, `--fim_format`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the tokenizer has no token {token:?} for the {format} FIM format: drop --fim_format to use the one the tokenizer's special tokens name, or serve without infilling")]
pub struct MissingSentinel {
    pub token: String,
    pub format: FimFormat,
}

impl FimEncoder {
    /// The encoder for `format` (None: the one the tokenizer's added tokens hold), or None where
    /// the tokenizer can infill in no format.
    pub fn new(tokenizer: &tokenizers::Tokenizer, format: Option<FimFormat>) -> Result<Option<Self>, MissingSentinel> {
        let added: std::collections::HashMap<String, u32> =
            tokenizer.get_added_tokens_decoder().into_iter().map(|(id, t)| (t.content, id)).collect();
        let Some(format) = format.or_else(|| FimFormat::detect(|t| added.contains_key(t))) else {
            return Ok(None);
        };
        let spec = format.spec();
        let mut sentinels = vec![];
        for token in
            spec.sentinels().into_iter().chain(spec.repo.iter().flat_map(|r| [r.repo_name, r.file_sep])).chain(spec.end.iter().copied())
        {
            let spelled = [token.to_string(), format!("{}{token}", spec.vocab_prefix)];
            match spelled.iter().find_map(|s| added.get(s).or(tokenizer.token_to_id(s).as_ref()).copied()) {
                Some(id) => sentinels.push((token, id)),
                // End tokens and repository layouts are optional; the template's are not.
                None if spec.sentinels().contains(&token) => return Err(MissingSentinel { token: token.to_string(), format }),
                None => {}
            }
        }
        let mut text = tokenizer.clone();
        text.set_encode_special_tokens(true);
        Ok(Some(Self { format, text, sentinels, start: zerotune_hf::tokenizer::document_prefix(tokenizer) }))
    }

    /// The ids that end the middle (those of the format's end tokens the tokenizer holds).
    pub fn end_ids(&self) -> Vec<u32> {
        let end = self.format.spec().end;
        self.sentinels.iter().filter(|(t, _)| end.contains(t)).map(|&(_, id)| id).collect()
    }

    /// The ids of `segments` (rendered in this encoder's format).
    pub fn encode(&self, segments: &[Segment]) -> Result<Vec<u32>, tokenizers::Error> {
        let mut ids = self.start.clone();
        for segment in segments {
            match segment {
                Segment::Special(token) => match self.sentinels.iter().find(|(t, _)| t == token) {
                    Some(&(_, id)) => ids.push(id),
                    None => return Err(format!("{token:?} is not a sentinel of the {} FIM format", self.format).into()),
                },
                Segment::Text(text) => ids.extend_from_slice(self.text.encode(text.as_str(), false)?.get_ids()),
            }
        }
        Ok(ids)
    }
}

#[cfg(test)]
#[path = "fim_tests.rs"]
mod tests;
