//! The NBD gateway with real NBD clients (nbdinfo, qemu-io, qemu-img): handshake, reads and
//! writes at any offset, zeroes and discards, and coherence between two gateways serving
//! one image.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use store_integration::{run_tool, tool_ok, ClusterOpts, TestCluster};

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    run_tool(cmd, args)
}

fn ok(cmd: &str, args: &[&str]) -> String {
    tool_ok(cmd, args)
}

#[test]
fn nbd_clients_read_and_write_images_coherently_through_two_gateways() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        device_size: "1G",
        ..Default::default()
    });
    c.create_pool("vm-pool", 16);
    c.ctl_ok(&["image", "create", "vm-pool/disk0", "--size", "64M"]);
    let a = c.start_gateway("nbd-a");
    let b = c.start_gateway("nbd-b");
    let ua = format!("nbd://{a}/vm-pool/disk0");
    let ub = format!("nbd://{b}/vm-pool/disk0");

    let list = ok("nbdinfo", &["--list", &format!("nbd://{a}")]);
    assert!(list.contains("export=\"vm-pool/disk0\""), "{list}");
    let info = ok("nbdinfo", &[&ua]);
    assert!(info.contains("export-size: 67108864"), "{info}");
    assert!(
        info.contains("can_multi_conn: true") && info.contains("can_fua: true"),
        "{info}"
    );

    // Writes through A at unaligned offsets across object boundaries; reads through B.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4193304 3M",
            "-c",
            "write -P 0x5c 63M 1M",
            &ua,
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 4193304 3M",
            "-c",
            "read -P 0x5c 63M 1M",
            "-c",
            "read -P 0 0 4193304",
            &ub,
        ],
    );
    // base:allocation through structured replies: what was written is data, the rest holes.
    let map = ok("nbdinfo", &["--map", &ua]);
    let runs: Vec<(u64, u64, String)> = map
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(3..)?.join(" "),
            ))
        })
        .collect();
    // At the OSDs' 4 KiB block granularity (and no further than an object's end): the
    // blocks written, nothing else.
    assert_eq!(
        runs,
        vec![
            (0, 4_190_208, "hole,zero".to_string()),
            (4_190_208, 3_148_824, "data".to_string()),
            (7_339_032, 58_721_256, "hole,zero".to_string()),
            (66_060_288, 1_048_576, "data".to_string()),
        ],
        "{map}"
    );
    // qemu-img map sees the same holes.
    let qmap: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["map", "--output=json", "-f", "raw", &ua]))
            .expect("qemu-img map json");
    let data: Vec<(u64, u64)> = qmap
        .as_array()
        .expect("extents")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        data,
        vec![(4_190_208, 3_148_824), (66_060_288, 1_048_576)],
        "{qmap}"
    );
    let info = ok("nbdinfo", &[&ub]);
    assert!(info.contains("structured"), "{info}");
    // Zeroes (allocated and not) and a discard through B, seen through A.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -z 4194304 1M",
            "-c",
            "write -z -u 6M 512k",
            "-c",
            "discard 63M 4096",
            &ub,
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 4194304 1M",
            "-c",
            "read -P 0 6M 512k",
            "-c",
            "read -P 0 63M 4096",
            "-c",
            "read -P 0x5c 66064384 1044480",
            &ua,
        ],
    );

    // A random 256 MiB disk image: in through A, out again through B, compared.
    c.ctl_ok(&["image", "create", "vm-pool/big", "--size", "256M"]);
    let src = c.dir.path().join("src.raw");
    let mut data = vec![0u8; 256 << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut data))
        .expect("random source");
    std::fs::write(&src, &data).expect("source");
    drop(data);
    let src_s = src.to_str().expect("utf8");
    let back = c.dir.path().join("back.raw");
    let back_s = back.to_str().expect("utf8");
    let (big_a, big_b) = (
        format!("nbd://{a}/vm-pool/big"),
        format!("nbd://{b}/vm-pool/big"),
    );
    ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &big_a],
    );
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &big_b, back_s],
    );
    let cmp = ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, back_s],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    let cmp = ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &big_a],
    );
    assert!(cmp.contains("identical"), "{cmp}");

    // An unknown export is refused; garbage on the port closes only that connection.
    let (found, out) = run("nbdinfo", &[&format!("nbd://{a}/vm-pool/nope")]);
    assert!(!found, "unknown export accepted: {out}");
    let mut s = TcpStream::connect(&a).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("server greeting");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    let _ = s.write_all(&[0xff; 4096]);
    let mut buf = [0u8; 64];
    let mut closed = false;
    for _ in 0..100 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => {}
        }
    }
    assert!(
        closed,
        "the gateway must close a connection that sends garbage"
    );
    ok("nbdinfo", &[&ua]);
    c.check_logs();
}
