//! Tests of the pipeline's stages (pipeline.rs), each over plain data.

use super::*;
use crate::dedup::DedupMode;

fn named(name: &str, text: &str) -> Named {
    Named { name: name.into(), doc: Document { text: text.into(), url: Some(name.into()) } }
}

fn words(n: usize, tag: &str) -> String {
    (0..n).map(|i| format!("{tag}{i}")).collect::<Vec<_>>().join("\n")
}

#[test]
fn split_keeps_documents_whole_and_is_seeded() {
    let docs: Vec<usize> = (0..40).collect();
    let (train, val, counts) = split(docs.clone(), 5, 7);
    assert_eq!((train.len(), val.len()), (38, 2));
    assert_eq!((counts.train_documents, counts.validation_documents), (38, 2));
    assert!(val.iter().all(|d| !train.contains(d)));
    assert_eq!(split(docs, 5, 7).1, val, "same seed, same split");
    assert_eq!(split(vec![1, 2, 3], 5, 7).1.len(), 1, "at least one validation document");
    assert_eq!(split(vec![1, 2, 3], 0, 7).1.len(), 0);
}

#[test]
fn cut_splits_large_documents_at_line_boundaries_with_a_count() {
    let line = "x".repeat(99) + "\n";
    let big = line.repeat(1000); // 100 000 bytes
    let (out, counts) = cut(vec![named("big.py", &big), named("small.py", "a\n")], 4096);
    assert_eq!(counts.documents_cut, 1);
    assert_eq!(counts.pieces, 100000usize.div_ceil(4000));
    assert_eq!(out.len(), counts.pieces + 1);
    for piece in &out[..counts.pieces] {
        assert!(piece.doc.text.len() <= 4096 && piece.doc.text.ends_with('\n'), "{}", piece.name);
    }
    assert_eq!(out[0].name, "big.py#part1");
    assert_eq!(out[..counts.pieces].iter().map(|n| n.doc.text.as_str()).collect::<String>(), big, "nothing lost");
    // A single line longer than the limit is cut at character boundaries.
    let ranges = cut_points(&"é".repeat(3000), 1001);
    assert!(ranges.iter().all(|r| r.len() <= 1001 && r.len() % 2 == 0));
    assert_eq!(ranges.last().unwrap().end, 6000);
}

#[test]
fn scrub_modes() {
    let secret = format!("{}_{}", "ghp", "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5");
    let docs = || vec![named("a.py", &format!("x = 1\nt = '{secret}'\n")), named("b.py", "y = 2\n")];
    let scanner = Scanner::new();
    let (out, _, counts) = scrub_stage(docs(), None, SecretsMode::Redact, &scanner).unwrap();
    assert_eq!(counts.findings, ["a.py:2 github_token"]);
    assert_eq!((counts.values_redacted, out.len()), (1, 2));
    assert_eq!(out[0].doc.text, "x = 1\nt = '<SECRET:github_token>'\n");
    let (out, _, counts) = scrub_stage(docs(), None, SecretsMode::DropFile, &scanner).unwrap();
    assert_eq!((counts.documents_dropped, out.len(), out[0].name.as_str()), (1, 1, "b.py"));
    let (out, _, _) = scrub_stage(docs(), None, SecretsMode::Keep, &scanner).unwrap();
    assert!(out[0].doc.text.contains(&secret));
    let err = scrub_stage(docs(), Some(vec![named("v.py", &format!("\n\nk = '{secret}'"))]), SecretsMode::Fail, &scanner)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("a.py:2 github_token") && err.contains("v.py:3 github_token"), "{err}");
    assert!(!err.contains(&secret), "the value is never shown");
}

#[test]
fn dedup_and_leakage_name_what_they_removed() {
    let base = words(300, "w");
    let near = base.replacen("w150\n", "changed\n", 1);
    let docs = vec![
        named("long/path/a.py", &base),
        named("b.py", &base.replace('\n', "\r\n")),
        named("c.py", &near),
        named("d.py", &words(300, "z")),
    ];
    let (kept, sigs, counts) = dedup(docs, DedupMode::Near, 0.85);
    assert_eq!((counts.exact, counts.near), (1, 1));
    assert_eq!(kept.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["b.py", "d.py"]);
    assert_eq!(counts.removed[0].name, "long/path/a.py");
    assert_eq!(counts.removed[0].kept, "b.py");
    let val = vec![named("v1.py", &near.replacen("w10\n", "x10\n", 1)), named("v2.py", &words(300, "q"))];
    let (val, leaks) = leakage(&kept, &sigs, val, DedupMode::Near, 0.85);
    assert_eq!((leaks.near, val.len(), val[0].name.as_str()), (1, 1, "v2.py"));
}

#[test]
fn the_whole_pipeline_on_a_tree_and_a_jsonl_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("copy")).unwrap();
    for i in 0..20 {
        std::fs::write(src.join(format!("f{i}.py")), words(200, &format!("t{i}_"))).unwrap();
    }
    std::fs::write(src.join("copy/f0.py"), words(200, "t0_")).unwrap();
    let inputs = Inputs {
        train: src.clone(),
        validation: None,
        text_column: "text".into(),
        filter: Filter::default(),
        validation_split_percentage: 10,
        seed: 1,
    };
    let got = run(&inputs, &Hygiene::default()).unwrap();
    assert_eq!((got.train.len(), got.validation.len()), (18, 2));
    assert_eq!(got.report.skipped.get("duplicate"), Some(&1));
    assert_eq!(got.report.dedup.removed[0].name, "copy/f0.py");
    for stage in ["collect", "scrub", "cut", "dedup", "split", "leakage"] {
        assert!(got.report.seconds.contains_key(stage), "{stage}");
    }
    // Rows without a url are named input#row.
    let jsonl = dir.path().join("d.jsonl");
    std::fs::write(
        &jsonl,
        format!("{{\"text\": \"a\"}}\n{{\"text\": \"token = '{}_{}'\"}}\n", "ghp", "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"),
    )
    .unwrap();
    let inputs = Inputs { train: jsonl.clone(), validation_split_percentage: 0, ..inputs };
    let got = run(&inputs, &Hygiene::default()).unwrap();
    assert_eq!(got.report.secrets.findings, [format!("{}#2:1 github_token", jsonl.display())]);
    // Everything deduplicated away but one document; a training split left empty is an error.
    std::fs::write(&jsonl, "{\"text\": \"same\"}\n{\"text\": \"same\"}\n").unwrap();
    let err = run(&Inputs { validation_split_percentage: 50, ..inputs }, &Hygiene::default()).err().unwrap().to_string();
    assert!(err.contains("training split is empty"), "{err}");
}
