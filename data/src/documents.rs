//! Documents from one input, like `run_clm.py` reads them: `.jsonl`/`.json` (JSON Lines or one
//! array of objects), `.csv`, `.txt` (one document), a source directory (files2jsonl), or JSON
//! Lines on standard input (`-`).

use std::io::BufRead;
use std::path::Path;

use crate::files2jsonl::{self, Filter};
use zerotune_hf::io_err;

use crate::{DataError, Result};

/// One document (a source file, a JSON or CSV row, a .txt file).
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub text: String,
    /// Where it came from: a source file's path relative to the root, a row's `url` field, a
    /// .txt file's name; none for rows without one.
    pub url: Option<String>,
}

/// Reads the documents of one input, by its extension (or a directory of source files).
pub fn load_documents(path: &Path, text_column: &str, filter: &Filter) -> Result<Vec<Document>> {
    if path.is_dir() {
        let collected = files2jsonl::collect(path, filter)?;
        tracing::info!("{}: {}", path.display(), collected.summary());
        return Ok(collected.files.into_iter().map(|f| Document { text: f.text, url: Some(f.url) }).collect());
    }
    if path == Path::new("-") {
        return read_json(path, std::io::stdin().lock(), text_column);
    }
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let docs = match ext.as_str() {
        "jsonl" | "json" => read_json(path, file, text_column)?,
        "csv" => read_csv(path, file, text_column)?,
        "txt" => {
            let text = std::io::read_to_string(file).map_err(|e| data(path, format!("not UTF-8 text: {e}")))?;
            vec![Document { text, url: path.file_name().map(|n| n.to_string_lossy().into_owned()) }]
        }
        _ => return Err(data(path, format!("unsupported extension {ext:?}: use .jsonl, .json, .csv, .txt or a directory"))),
    };
    Ok(docs)
}

fn data(path: &Path, message: impl Into<String>) -> DataError {
    DataError::File { path: path.into(), message: message.into() }
}

/// JSON Lines (one object per line), or a single JSON array of objects.
fn read_json(path: &Path, file: impl std::io::Read, column: &str) -> Result<Vec<Document>> {
    let mut reader = std::io::BufReader::new(file);
    let first = reader.fill_buf().map_err(io_err(path))?.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') {
        let rows: Vec<serde_json::Value> =
            serde_json::from_reader(reader).map_err(|e| data(path, format!("not a JSON array of objects: {e}")))?;
        return rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| text_of(row, column).map_err(|m| data(path, format!("item {i}: {m}"))))
            .collect();
    }
    let mut docs = vec![];
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| DataError::Line { path: path.into(), line: i + 1, message: e.to_string() })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DataError::Line { path: path.into(), line: i + 1, message };
        let row: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        docs.push(text_of(row, column).map_err(bad)?);
    }
    Ok(docs)
}

/// The row's text (moved out, not copied: a document may be tens of MB) and url.
fn text_of(mut row: serde_json::Value, column: &str) -> std::result::Result<Document, String> {
    let url = row.get("url").and_then(|u| u.as_str()).map(str::to_string);
    match row.as_object_mut().and_then(|o| o.remove(column)) {
        Some(serde_json::Value::String(text)) => Ok(Document { text, url }),
        Some(other) => Err(format!("column {column:?} is not a string but {other}")),
        None => Err(format!("no {column:?} column (set --text_column_name)")),
    }
}

fn read_csv(path: &Path, file: std::fs::File, column: &str) -> Result<Vec<Document>> {
    let mut reader = csv::Reader::from_reader(file);
    let headers = reader.headers().map_err(|e| data(path, format!("cannot read the CSV header: {e}")))?.clone();
    let url = headers.iter().position(|h| h == "url");
    let index = headers.iter().position(|h| h == column).ok_or_else(|| {
        data(path, format!("no {column:?} column among {:?} (set --text_column_name)", headers.iter().collect::<Vec<_>>()))
    })?;
    let mut docs = vec![];
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| DataError::Line { path: path.into(), line: i + 2, message: format!("malformed CSV: {e}") })?;
        let url = url.and_then(|u| record.get(u)).map(str::to_string);
        docs.push(Document { text: record.get(index).unwrap_or_default().to_string(), url });
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_errors_name_the_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\": \"a\"}\n{\"text\": oops}\n").unwrap();
        let err = load_documents(&path, "text", &Filter::default()).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:2: malformed JSON"), "{err}");
        std::fs::write(&path, "{\"content\": \"a\"}\n").unwrap();
        let err = load_documents(&path, "text", &Filter::default()).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:1: no \"text\" column"), "{err}");
    }

    #[test]
    fn json_array_csv_and_txt_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("d.json");
        std::fs::write(&json, r#"[{"code": "x = 1"}, {"code": "y = 2"}]"#).unwrap();
        let got = load_documents(&json, "code", &Filter::default()).unwrap();
        assert_eq!(got.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(), ["x = 1", "y = 2"]);
        let jsonl = dir.path().join("u.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"a\", \"url\": \"src/a.py\"}\n{\"text\": \"b\"}\n").unwrap();
        let urls: Vec<Option<String>> = load_documents(&jsonl, "text", &Filter::default()).unwrap().into_iter().map(|d| d.url).collect();
        assert_eq!(urls, [Some("src/a.py".to_string()), None]);
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "id,text\n1,\"a, b\"\n2,c\n").unwrap();
        assert_eq!(load_documents(&csv, "text", &Filter::default()).unwrap()[0].text, "a, b");
        let txt = dir.path().join("d.txt");
        std::fs::write(&txt, "line 1\nline 2\n").unwrap();
        let doc = &load_documents(&txt, "text", &Filter::default()).unwrap()[0];
        assert_eq!((doc.text.as_str(), doc.url.as_deref()), ("line 1\nline 2\n", Some("d.txt")));
    }
}
