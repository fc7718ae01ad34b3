//! A minimal HTTP/1.1 client over a real socket, for sending the exact bytes an editor sends and
//! for reading a server-sent event stream a chunk at a time (or walking away from it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// A response: status, headers (lower-case names) and the whole body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends one request and reads the whole response.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut reader = send(addr, method, path, headers, body, false);
    let (status, headers) = read_head(&mut reader);
    let mut body = vec![];
    if headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")) {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend(chunk);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    Reply { status, headers, body: String::from_utf8(body).unwrap() }
}

pub fn post(addr: &str, path: &str, body: &str) -> Reply {
    request(addr, "POST", path, &[("Content-Type", "application/json")], body)
}

pub fn get(addr: &str, path: &str) -> Reply {
    request(addr, "GET", path, &[], "")
}

/// A response whose body is read as it arrives.
pub struct Stream {
    pub status: u16,
    reader: BufReader<TcpStream>,
    pending: String,
}

impl Stream {
    pub fn open(addr: &str, path: &str, body: &str) -> Self {
        // Keep-alive, as the SDKs and editors connect: a server notices a client that closes it.
        let mut reader = send(addr, "POST", path, &[("Content-Type", "application/json")], body, true);
        let (status, _) = read_head(&mut reader);
        Self { status, reader, pending: String::new() }
    }

    /// The next server-sent event's data, or None at the end of the body.
    pub fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let event: String = self.pending.drain(..end + 2).collect();
                return Some(event.trim_end().strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {event:?}")).into());
            }
            let chunk = read_chunk(&mut self.reader)?;
            self.pending.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every remaining event's data.
    pub fn rest(mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str, keep_alive: bool) -> BufReader<TcpStream> {
    let mut socket = TcpStream::connect(addr).unwrap();
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).unwrap();
    socket.write_all(body.as_bytes()).unwrap();
    BufReader::new(socket)
}

fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line: {line:?}"));
    let mut headers = vec![];
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let Some((name, value)) = line.trim_end().split_once(':') else { break };
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    (status, headers)
}

/// One chunk of a chunked body; None after the last.
fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    if reader.read_line(&mut size).unwrap() == 0 {
        return None;
    }
    let size = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).unwrap();
    chunk.truncate(size);
    Some(chunk)
}
