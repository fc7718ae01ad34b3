//! The FIM table's rules: each family renders as its model card writes it, every rendering
//! parses back to what it was made from, a prompt in one family's format re-renders in another's,
//! and a vocabulary's special tokens pick the format.

use super::*;

fn infill(prefix: &str, suffix: &str) -> Infill {
    Infill { prefix: prefix.into(), suffix: suffix.into(), ..Default::default() }
}

fn with_files() -> Infill {
    Infill {
        prefix: "def f():\n    ".into(),
        suffix: "\n\nprint(f())\n".into(),
        repo: Some("proj".into()),
        files: vec![
            FileChunk { path: "b.py".into(), text: "import os\n".into() },
            FileChunk { path: "c/d.py".into(), text: "x = 1".into() },
        ],
        path: Some("a.py".into()),
    }
}

/// The infills each test goes over: plain, empty sides, unicode, lines, and other files.
fn cases() -> Vec<Infill> {
    vec![infill("def add(a, b):\n    return ", "\n"), infill("", "tail"), infill("héllo ✓ ", ""), infill("x", "y\nz\n"), with_files()]
}

/// What a format keeps of `infill`: a family without a repository layout keeps each file as an
/// unnamed snippet, and neither the repository's name nor the current path; CodeGen2, whose
/// template opens with the prefix, reads the snippets back as part of it.
fn kept(format: FimFormat, infill: &Infill) -> Infill {
    if format.spec().repo.is_some() || (infill.files.is_empty() && infill.repo.is_none()) {
        return infill.clone();
    }
    let files: Vec<FileChunk> = infill.files.iter().map(|f| FileChunk { path: String::new(), text: f.text.clone() }).collect();
    if format == FimFormat::CodeGen2 {
        let snippets: String = files.iter().map(|f| format!("\n\n--- snippet ---\n\n{}", f.text)).collect();
        return Infill { prefix: snippets + &infill.prefix, suffix: infill.suffix.clone(), ..Default::default() };
    }
    Infill { files, repo: None, path: None, ..infill.clone() }
}

#[test]
fn each_family_renders_as_its_card_writes_it() {
    let (p, s) = ("PRE", "SUF");
    let cases = [
        (FimFormat::Qwen, Order::Psm, "<|fim_prefix|>PRE<|fim_suffix|>SUF<|fim_middle|>"),
        (FimFormat::StarCoder, Order::Psm, "<fim_prefix>PRE<fim_suffix>SUF<fim_middle>"),
        (FimFormat::StarCoder, Order::Spm, "<fim_prefix><fim_suffix>SUF<fim_middle>PRE"),
        (FimFormat::DeepSeek, Order::Psm, "<｜fim▁begin｜>PRE<｜fim▁hole｜>SUF<｜fim▁end｜>"),
        (FimFormat::CodeLlama, Order::Psm, "<PRE> PRE <SUF>SUF <MID>"),
        (FimFormat::CodeLlama, Order::Spm, "<PRE> <SUF>SUF <MID> PRE"),
        (FimFormat::CodeGen2, Order::Psm, "PRE<mask_1>SUF<|endoftext|><sep><mask_1>"),
        // No SPM template: PSM.
        (FimFormat::Qwen, Order::Spm, "<|fim_prefix|>PRE<|fim_suffix|>SUF<|fim_middle|>"),
    ];
    for (format, order, want) in cases {
        assert_eq!(to_text(&render(format, order, &infill(p, s))), want, "{format} {order:?}");
    }
}

#[test]
fn repository_files_take_each_familys_layout() {
    let qwen = to_text(&render(FimFormat::Qwen, Order::Psm, &with_files()));
    assert_eq!(
        qwen,
        "<|repo_name|>proj\n<|file_sep|>b.py\nimport os\n\n<|file_sep|>c/d.py\nx = 1\n<|file_sep|>a.py\n<|fim_prefix|>def f():\n    <|fim_suffix|>\n\nprint(f())\n<|fim_middle|>"
    );
    let starcoder = to_text(&render(FimFormat::StarCoder, Order::Psm, &with_files()));
    assert_eq!(
        starcoder,
        "<repo_name>proj<file_sep>b.py\nimport os\n<file_sep>c/d.py\nx = 1<file_sep><fim_prefix>a.py\ndef f():\n    <fim_suffix>\n\nprint(f())\n<fim_middle>"
    );
    // llama.cpp's placement for a family without file separators.
    let deepseek = to_text(&render(FimFormat::DeepSeek, Order::Psm, &with_files()));
    assert!(deepseek.starts_with("\n\n--- snippet ---\n\nimport os\n\n\n--- snippet ---\n\nx = 1<｜fim▁begin｜>def f():"), "{deepseek:?}");
}

#[test]
fn every_rendering_parses_back_to_what_it_was_made_from() {
    for spec in FORMATS {
        for order in [Order::Psm, Order::Spm] {
            for case in cases() {
                // Without an SPM template, or with an empty prefix, both orders may render alike.
                let rendered = to_text(&render(spec.format, order, &case));
                let psm = to_text(&render(spec.format, Order::Psm, &case));
                let order_kept = if rendered == psm { Order::Psm } else { order };
                let parsed = parse(&rendered).unwrap_or_else(|| panic!("{} {order:?}: {rendered:?} did not parse", spec.name));
                assert_eq!(parsed, (spec.format, order_kept, kept(spec.format, &case)), "{} {order:?}: {rendered:?}", spec.name);
            }
        }
    }
}

/// Continue's default StarCoder template on a Qwen model, and every other pair.
#[test]
fn a_prompt_in_one_familys_format_renders_in_anothers() {
    for from in FORMATS {
        for to in FORMATS {
            for case in cases() {
                let sent = to_text(&render(from.format, Order::Psm, &case));
                let (_, _, asked) = parse(&sent).unwrap();
                let want = render(to.format, Order::Psm, &kept(from.format, &case));
                assert_eq!(render(to.format, Order::Psm, &asked), want, "{} -> {}: {sent:?}", from.name, to.name);
            }
        }
    }
}

#[test]
fn continues_qwen_prompt_with_snippets_parses_into_its_parts() {
    let prompt =
        "<|repo_name|>proj\n<|file_sep|>b.py\nimport os\n\n<|file_sep|>a.py\n<|fim_prefix|>def f():\n    <|fim_suffix|>\n<|fim_middle|>";
    let (format, order, got) = parse(prompt).unwrap();
    assert_eq!((format, order), (FimFormat::Qwen, Order::Psm));
    assert_eq!(got.repo.as_deref(), Some("proj"));
    assert_eq!(got.files, [FileChunk { path: "b.py".into(), text: "import os\n".into() }]);
    assert_eq!(got.path.as_deref(), Some("a.py"));
    assert_eq!((got.prefix.as_str(), got.suffix.as_str()), ("def f():\n    ", "\n"));
}

#[test]
fn plain_or_half_rendered_prompts_are_not_infills() {
    for prompt in [
        "def f():\n    return 1\n",
        "",
        "<|fim_prefix|>only a prefix",
        "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>trailing text",
        "<fim_suffix>b<fim_middle>",
        "text before<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    ] {
        assert_eq!(parse(prompt), None, "{prompt:?}");
    }
}

/// User text stays text: a suffix holding another sentinel's spelling is one text segment, not a
/// special token (llama.cpp tokenizes prefix and suffix with parse_special=false).
#[test]
fn user_text_is_never_a_sentinel() {
    let tricky = infill("a <|fim_middle|> b", "<fim_prefix>");
    for spec in FORMATS {
        let specials: Vec<&str> = render(spec.format, Order::Psm, &tricky)
            .into_iter()
            .filter_map(|s| if let Segment::Special(t) = s { Some(t) } else { None })
            .collect();
        let template: Vec<&str> = spec.psm.iter().filter_map(|p| if let Piece::Token(t) = p { Some(*t) } else { None }).collect();
        assert_eq!(specials, template, "{}", spec.name);
    }
}

#[test]
fn the_vocabularys_special_tokens_pick_the_format() {
    fn vocab(tokens: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |t| tokens.contains(&t)
    }
    const QWEN: &[&str] =
        &["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"];
    assert_eq!(FimFormat::detect(vocab(QWEN)), Some(FimFormat::Qwen));
    assert_eq!(
        FimFormat::detect(vocab(&["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"])),
        Some(FimFormat::StarCoder)
    );
    assert_eq!(FimFormat::detect(vocab(&["<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"])), Some(FimFormat::DeepSeek));
    // HF's Code Llama tokenizer spells them with a leading ▁.
    assert_eq!(FimFormat::detect(vocab(&["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"])), Some(FimFormat::CodeLlama));
    assert_eq!(FimFormat::detect(vocab(&["<mask_1>", "<sep>", "<eom>", "<|endoftext|>"])), Some(FimFormat::CodeGen2));
    // CodeGen 1: no FIM tokens; one sentinel short is not enough either.
    assert_eq!(FimFormat::detect(vocab(&["<|endoftext|>"])), None);
    assert_eq!(FimFormat::detect(vocab(&["<fim_prefix>", "<fim_suffix>"])), None);
}

#[test]
fn formats_go_by_their_flag_names_and_stop_at_their_sentinels() {
    for spec in FORMATS {
        assert_eq!(FimFormat::from_name(spec.name), Ok(spec.format));
        assert_eq!(spec.format.to_string(), spec.name);
        let stops = spec.stops();
        assert!(spec.end.iter().chain(&spec.sentinels()).all(|t| stops.contains(t)), "{}: {stops:?}", spec.name);
    }
    let err = FimFormat::from_name("santacoder").unwrap_err().to_string();
    assert!(err.contains("--fim_format \"santacoder\"") && err.contains("qwen, starcoder, deepseek, codellama, codegen2"), "{err}");
}

/// A byte-level tokenizer without merges (one token per byte, as GPT-2's alphabet spells it),
/// with `added` as special tokens after the bytes, and `<bos>` put first by its post-processor
/// when `bos` (as DeepSeek-Coder's).
fn byte_tokenizer(added: &[&str], bos: bool) -> tokenizers::Tokenizer {
    use serde_json::json;
    let mut alphabet: Vec<String> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().map(String::from).collect();
    alphabet.sort();
    let vocab: serde_json::Map<String, serde_json::Value> = alphabet.iter().enumerate().map(|(i, c)| (c.clone(), json!(i))).collect();
    let mut tokens: Vec<&str> = added.to_vec();
    tokens.push("<bos>");
    let added: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"id": alphabet.len() + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let bos_id = alphabet.len() + tokens.len() - 1;
    let post = bos.then(|| {
        json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [bos_id], "tokens": ["<bos>"]}}})
    });
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let file = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": post, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}});
    file.to_string().parse().expect("a valid tokenizer.json")
}

const QWEN_TOKENS: &[&str] =
    &["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"];

/// The encoder's ids are the tokenizer's own for the whole rendered prompt (HF's
/// `tokenizer(prompt)`, which splits at special tokens the same way), BOS included once.
#[test]
fn the_encoder_gives_the_tokenizers_ids_of_the_rendered_prompt() {
    let deepseek = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", "<｜end▁of▁sentence｜>"];
    for (added, bos, format) in [(QWEN_TOKENS, false, FimFormat::Qwen), (&deepseek[..], true, FimFormat::DeepSeek)] {
        let tokenizer = byte_tokenizer(added, bos);
        let encoder = FimEncoder::new(&tokenizer, None).unwrap().expect("the sentinels are there");
        assert_eq!(encoder.format, format);
        for case in cases() {
            let segments = render(format, Order::Psm, &case);
            let whole = tokenizer.encode(to_text(&segments).as_str(), true).unwrap();
            assert_eq!(encoder.encode(&segments).unwrap(), whole.get_ids(), "{format}: {case:?}");
        }
        let end = encoder.end_ids();
        let held: Vec<u32> = format.spec().end.iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        assert!(!held.is_empty() && end == held, "{format}: {end:?} vs {held:?}");
    }
}

#[test]
fn code_that_spells_a_sentinel_stays_text_when_encoded() {
    let tokenizer = byte_tokenizer(QWEN_TOKENS, false);
    let encoder = FimEncoder::new(&tokenizer, None).unwrap().unwrap();
    let segments = render(FimFormat::Qwen, Order::Psm, &infill("x = '<|fim_middle|>'", "<|endoftext|>"));
    let ids = encoder.encode(&segments).unwrap();
    let sentinel_ids: Vec<u32> = QWEN_TOKENS.iter().map(|t| tokenizer.token_to_id(t).unwrap()).collect();
    let specials: Vec<u32> = ids.iter().copied().filter(|id| sentinel_ids.contains(id)).collect();
    let template: Vec<u32> =
        ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"].iter().map(|t| tokenizer.token_to_id(t).unwrap()).collect();
    assert_eq!(specials, template);
    // Encoding the whole text instead would have made them sentinels.
    let whole = tokenizer.encode(to_text(&segments).as_str(), true).unwrap();
    assert_eq!(whole.get_ids().iter().filter(|id| sentinel_ids.contains(id)).count(), 5);
}

#[test]
fn a_tokenizer_without_sentinels_infills_in_no_format_and_a_forced_one_is_refused_by_name() {
    let tokenizer = byte_tokenizer(&["<|endoftext|>"], false);
    assert!(FimEncoder::new(&tokenizer, None).unwrap().is_none());
    let err = FimEncoder::new(&tokenizer, Some(FimFormat::StarCoder)).err().expect("refused");
    assert_eq!(err, MissingSentinel { token: "<fim_prefix>".into(), format: FimFormat::StarCoder });
    assert!(err.to_string().contains("--fim_format"), "{err}");
    // Forced where the sentinels are: that format, even if another would be detected.
    let both =
        byte_tokenizer(&["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], false);
    assert_eq!(FimEncoder::new(&both, None).unwrap().unwrap().format, FimFormat::Qwen);
    assert_eq!(FimEncoder::new(&both, Some(FimFormat::StarCoder)).unwrap().unwrap().format, FimFormat::StarCoder);
}
