//! Bad NBD input against a real gateway: unknown options and commands, malformed option
//! payloads, requests past the end, zero-length and oversized requests, a client that
//! disconnects mid-request, and a few hundred mutated byte streams. Each gets the error
//! the protocol names or the end of that one connection; the gateway keeps serving every
//! other connection with the data intact, and never logs an ERROR.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use store_integration::{tool_ok, xorshift, ClusterOpts, TestCluster};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_BLOCK_STATUS: u16 = 7;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;
const EXPORT: &str = "vm-pool/disk0";
const SIZE: u64 = 8 << 20;

fn info_len() -> usize {
    Raw::info_payload(EXPORT).len()
}

/// A hand-driven NBD client: exactly the bytes we choose.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: &str) -> Raw {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("greeting");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).expect("client flags");
        Raw(s)
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).expect("option");
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).expect("option reply data");
        (kind, d)
    }

    fn info_payload(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// GO to the export; replies until ACK.
    fn go(&mut self) {
        self.option(OPT_GO, &Self::info_payload(EXPORT));
        loop {
            let (kind, _) = self.option_reply();
            if kind == REP_ACK {
                return;
            }
            assert!(kind < 1 << 31, "GO refused: {kind:#x}");
        }
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b).expect("request");
    }

    /// A simple reply: (handle, error), then `data_len` bytes if no error.
    fn reply(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).expect("reply");
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.0.read_exact(&mut d).expect("reply data");
        (handle, error, d)
    }
}

#[test]
fn bad_nbd_input_gets_protocol_errors_and_spares_other_connections() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        ..Default::default()
    });
    c.create_pool("vm-pool", 16);
    c.ctl_ok(&["image", "create", EXPORT, "--size", "8M"]);
    let addr = c.start_gateway("nbd-a");
    let uri = format!("nbd://{addr}/{EXPORT}");
    tool_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 64k", &uri]);

    // Handshake: an unknown option, a malformed INFO, an unknown export, then GO.
    let mut s = Raw::connect(&addr);
    s.option(99, b"whatever");
    assert_eq!(s.option_reply().0, REP_ERR_UNSUP);
    s.option(OPT_INFO, &[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(s.option_reply().0, REP_ERR_INVALID);
    s.option(OPT_INFO, &Raw::info_payload("vm-pool/nope"));
    assert_eq!(s.option_reply().0, REP_ERR_UNKNOWN);
    s.go();

    // Transmission: each bad request gets its errno and the connection goes on.
    s.request(CMD_READ, 1, SIZE - 10, 20, &[]);
    assert_eq!(s.reply(0).1, EINVAL, "read past the end");
    s.request(CMD_WRITE, 2, SIZE - 2, 4, &[1, 2, 3, 4]);
    assert_eq!(s.reply(0).1, ENOSPC, "write past the end");
    s.request(CMD_READ, 3, 0, 0, &[]);
    assert_eq!(s.reply(0).1, EINVAL, "zero-length read");
    s.request(42, 4, 0, 512, &[]);
    assert_eq!(s.reply(0).1, ENOTSUP, "unknown command");
    s.request(CMD_BLOCK_STATUS, 5, 0, 4096, &[]);
    assert_eq!(
        s.reply(0).1,
        EINVAL,
        "block status without the meta context"
    );
    s.request(CMD_READ, 6, 0, 64 << 20, &[]);
    assert_eq!(s.reply(0).1, EINVAL, "read above the maximum block size");
    s.request(CMD_READ, 7, 100, 1000, &[]);
    let (handle, error, data) = s.reply(1000);
    assert_eq!((handle, error), (7, 0));
    assert!(data.iter().all(|b| *b == 0x5a));

    // A write larger than the advertised maximum: the stream is lost, that connection ends.
    s.request(CMD_WRITE, 8, 0, 64 << 20, &[]);
    let mut buf = [0u8; 16];
    assert!(matches!(s.0.read(&mut buf), Ok(0) | Err(_)));

    // A client that vanishes mid-write: nothing of it lands.
    let mut s = Raw::connect(&addr);
    s.go();
    s.request(CMD_WRITE, 1, 0, 1 << 20, &[0xee; 1000]);
    drop(s);

    // Unknown client flags: the protocol says the server MUST drop the connection, so
    // the option after them gets no reply.
    let mut t = TcpStream::connect(&addr).expect("connect");
    t.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut hello = [0u8; 18];
    t.read_exact(&mut hello).expect("greeting");
    t.write_all(&(3u32 | 1 << 7).to_be_bytes()).expect("flags");
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(info_len() as u32).to_be_bytes());
    opt.extend_from_slice(&Raw::info_payload(EXPORT));
    let _ = t.write_all(&opt);
    let mut buf = [0u8; 64];
    assert!(
        match t.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        },
        "a handshake with unknown client flags must end the connection"
    );

    // Mutated streams: a valid handshake and request with bytes flipped, cut or repeated.
    let mut valid = Vec::new();
    valid.extend_from_slice(&3u32.to_be_bytes());
    valid.extend_from_slice(&IHAVEOPT.to_be_bytes());
    valid.extend_from_slice(&OPT_GO.to_be_bytes());
    let info = Raw::info_payload(EXPORT);
    valid.extend_from_slice(&(info.len() as u32).to_be_bytes());
    valid.extend_from_slice(&info);
    valid.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    valid.extend_from_slice(&[0, 0, 0, 0]);
    valid.extend_from_slice(&1u64.to_be_bytes());
    valid.extend_from_slice(&0u64.to_be_bytes());
    valid.extend_from_slice(&512u32.to_be_bytes());
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300 {
        let mut bytes = valid.clone();
        for _ in 0..(xorshift(&mut rng) % 4 + 1) {
            let at = (xorshift(&mut rng) % bytes.len() as u64) as usize;
            match xorshift(&mut rng) % 3 {
                0 => bytes[at] ^= 1 << (xorshift(&mut rng) % 8),
                1 => bytes.truncate(at),
                _ => bytes.insert(at, xorshift(&mut rng) as u8),
            }
            if bytes.is_empty() {
                break;
            }
        }
        let Ok(mut t) = TcpStream::connect(&addr) else {
            panic!("the gateway stopped accepting");
        };
        t.set_read_timeout(Some(Duration::from_millis(200))).ok();
        let mut hello = [0u8; 18];
        t.read_exact(&mut hello).expect("greeting while fuzzed");
        let _ = t.write_all(&bytes);
        let mut sink = [0u8; 4096];
        let _ = t.read(&mut sink);
    }

    // Other clients still get correct data, and the vanished write never landed.
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "read -P 0 64k 1M",
            &uri,
        ],
    );
    let info = tool_ok("nbdinfo", &[&uri]);
    assert!(info.contains("export-size: 8388608"), "{info}");
    c.check_logs();
}
