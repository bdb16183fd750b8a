//! A small blocking HTTP/1.1 client for the server's own tools: `demask loadgen` and the
//! tests (one request per connection, `Connection: close`; chunked bodies and server-sent
//! events decoded). Not a general-purpose client.
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A whole response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON (an error naming the status and body when it is not).
    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HTTP {}: body is not JSON ({e}): {}", self.status, self.text())))
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// `host:port` of a URL such as `http://127.0.0.1:8000` (or of a bare `host:port`).
pub fn host_port(url: &str) -> io::Result<String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if url.starts_with("https://") {
        return Err(bad("https is not supported by demask's client; use http://"));
    }
    let hp = rest.split('/').next().unwrap_or(rest);
    if hp.is_empty() {
        return Err(bad(format!("no host in `{url}`")));
    }
    Ok(if hp.contains(':') { hp.to_string() } else { format!("{hp}:80") })
}

/// Opens a connection and sends one request.
fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration) -> io::Result<BufReader<TcpStream>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    Ok(BufReader::new(s))
}

/// Reads the status line and headers.
fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("bad status line `{}`", line.trim_end())))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("connection closed in the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// Calls `sink` with each piece of the body as it arrives (chunked or not); stops early when
/// `sink` returns false.
fn read_body(r: &mut BufReader<TcpStream>, headers: &[(String, String)], mut sink: impl FnMut(&[u8]) -> bool) -> io::Result<()> {
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if !chunked {
        let len = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
        let mut buf = vec![0u8; 16 << 10];
        let mut left = len.unwrap_or(usize::MAX);
        while left > 0 {
            let n = r.read(&mut buf[..left.min(16 << 10)])?;
            if n == 0 {
                break;
            }
            left -= n;
            if !sink(&buf[..n]) {
                return Ok(());
            }
        }
        return Ok(());
    }
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| bad(format!("bad chunk size `{}`", line.trim())))?;
        if size == 0 {
            return Ok(());
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk)?;
        if !sink(&chunk[..size]) {
            return Ok(());
        }
    }
}

/// One request, the whole response.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration) -> io::Result<HttpResponse> {
    let mut r = send(addr, method, path, headers, body, timeout)?;
    let (status, hs) = read_head(&mut r)?;
    let mut out = Vec::new();
    read_body(&mut r, &hs, |b| {
        out.extend_from_slice(b);
        true
    })?;
    Ok(HttpResponse { status, headers: hs, body: out })
}

/// A streaming request: calls `on_data` with the `data:` payload of every server-sent event as
/// it arrives, until the stream ends or `on_data` returns false (which drops the connection,
/// as a client that goes away would). Returns the status and, when it is not 200, the body.
pub fn stream(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
    mut on_data: impl FnMut(&str) -> bool,
) -> io::Result<HttpResponse> {
    let mut r = send(addr, "POST", path, headers, body, timeout)?;
    let (status, hs) = read_head(&mut r)?;
    let mut raw = Vec::new();
    if status != 200 {
        read_body(&mut r, &hs, |b| {
            raw.extend_from_slice(b);
            true
        })?;
        return Ok(HttpResponse { status, headers: hs, body: raw });
    }
    // Bytes until a newline (a chunk may end inside a UTF-8 character).
    let mut pending: Vec<u8> = Vec::new();
    let mut data = String::new();
    read_body(&mut r, &hs, |b| {
        pending.extend_from_slice(b);
        while let Some(nl) = pending.iter().position(|&c| c == b'\n') {
            let bytes: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&bytes);
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if !data.is_empty() {
                    let go = on_data(&data);
                    data.clear();
                    if !go {
                        return false;
                    }
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        true
    })?;
    Ok(HttpResponse { status, headers: hs, body: raw })
}
