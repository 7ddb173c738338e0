//! Images on a real cluster: striping over 4 MiB objects, thin provisioning, discard,
//! resize, removal, and the `storectl image` commands.

use bytes::Bytes;
use std::time::Duration;

use store_image::{Image, ImageContext};
use store_integration::{ClusterOpts, TestCluster};
use store_types::ErrorCode;

const MIB: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed ^ (i as u8).wrapping_mul(29) ^ (i >> 9) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn images_stripe_over_objects_and_stay_thin() {
    let mut c = TestCluster::start(ClusterOpts {
        mons: 1,
        osds: 3,
        ..Default::default()
    });
    c.create_pool("vm-pool", 16);
    let out = c.ctl_ok(&["image", "create", "vm-pool/disk0", "--size", "64M"]);
    assert!(out.contains("created vm-pool/disk0"), "{out}");
    let info = c.ctl_json(&["image", "info", "vm-pool/disk0"]);
    assert_eq!(info["size"], 64 * MIB);
    assert_eq!(info["object_size"], 4 * MIB);
    assert_eq!(info["objects"], 16);
    let dup = c.ctl(&["image", "create", "vm-pool/disk0", "--size", "1M"]);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("ALREADY_EXISTS"));

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = c.object_client(&rt);
    let pool = client.pool("vm-pool").expect("pool").id;
    let ctx = {
        let _rt = rt.enter();
        ImageContext::new(
            client.clone(),
            "images test".into(),
            Duration::from_secs(30),
        )
    };
    let img = rt.block_on(Image::open(&ctx, pool, "disk0")).expect("open");
    // Thin: nothing written yet reads as zeros and no data object exists.
    assert!(rt
        .block_on(img.read(10 * MIB, 4096))
        .expect("read")
        .iter()
        .all(|b| *b == 0));
    assert_eq!(
        rt.block_on(client.list(pool)).expect("ls").len(),
        1,
        "only the header"
    );

    // An unaligned write across two object boundaries (3 objects).
    let data = pattern(7, (5 * MIB + 1234) as usize);
    let at = 4 * MIB - 777;
    rt.block_on(img.write(at, data.clone())).expect("write");
    assert_eq!(
        rt.block_on(img.read(at, data.len() as u64)).expect("read"),
        data
    );
    let objects = rt.block_on(client.list(pool)).expect("ls");
    assert_eq!(
        objects.len(),
        1 + 3,
        "header + the 3 objects written: {objects:?}"
    );
    // Around the write: zeros.
    let before = rt.block_on(img.read(at - 100, 100)).expect("read");
    assert!(before.iter().all(|b| *b == 0));

    // Discard a range covering one whole object and parts of two: zeros, object removed.
    rt.block_on(img.discard(4 * MIB - 10, 4 * MIB + 20))
        .expect("discard");
    let back = rt.block_on(img.read(at, data.len() as u64)).expect("read");
    let cut = (4 * MIB - 10 - at) as usize;
    assert_eq!(&back[..cut], &data[..cut]);
    assert!(back[cut..cut + (4 * MIB + 20) as usize]
        .iter()
        .all(|b| *b == 0));
    assert_eq!(
        &back[cut + (4 * MIB + 20) as usize..],
        &data[cut + (4 * MIB + 20) as usize..]
    );
    assert_eq!(
        rt.block_on(client.list(pool)).expect("ls").len(),
        1 + 2,
        "the whole object is gone"
    );

    // Out of range I/O is refused.
    let err = rt
        .block_on(img.write(64 * MIB - 1, pattern(1, 2)))
        .expect_err("past the end");
    assert_eq!(err.code, ErrorCode::InvalidArgument);

    // Resize: grow; shrink only with --allow-shrink, dropping the tail.
    c.ctl_ok(&["image", "resize", "vm-pool/disk0", "--size", "128M"]);
    assert_eq!(
        c.ctl_json(&["image", "info", "vm-pool/disk0"])["size"],
        128 * MIB
    );
    let refused = c.ctl(&["image", "resize", "vm-pool/disk0", "--size", "6M"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow-shrink"));
    c.ctl_ok(&[
        "image",
        "resize",
        "vm-pool/disk0",
        "--size",
        "6M",
        "--allow-shrink",
    ]);
    let img = rt.block_on(Image::open(&ctx, pool, "disk0")).expect("open");
    assert_eq!(img.size(), 6 * MIB);
    // Growing again shows zeros where the old data was, never stale bytes.
    c.ctl_ok(&["image", "resize", "vm-pool/disk0", "--size", "16M"]);
    let img = rt.block_on(Image::open(&ctx, pool, "disk0")).expect("open");
    assert!(rt
        .block_on(img.read(6 * MIB, 2 * MIB))
        .expect("read")
        .iter()
        .all(|b| *b == 0));
    let kept = rt.block_on(img.read(at, 6 * MIB - at)).expect("read");
    assert_eq!(&kept[..cut], &data[..cut]);

    // Import a raw file with a hole in the middle: the image stays thin; export and copy
    // give the same bytes back.
    let raw = c.dir.path().join("in.raw");
    let mut content = vec![0u8; (9 * MIB) as usize];
    content[..MIB as usize].copy_from_slice(&pattern(3, MIB as usize));
    content[(8 * MIB) as usize..].copy_from_slice(&pattern(4, MIB as usize));
    std::fs::write(&raw, &content).expect("raw file");
    let before = rt.block_on(client.list(pool)).expect("ls").len();
    c.ctl_ok(&[
        "image",
        "import",
        raw.to_str().expect("utf8"),
        "vm-pool/imported",
    ]);
    let after = rt.block_on(client.list(pool)).expect("ls").len();
    assert_eq!(
        after - before,
        1 + 2,
        "header + 2 data objects: the zero middle object is never written"
    );
    c.ctl_ok(&["image", "cp", "vm-pool/imported", "vm-pool/copy"]);
    for name in ["imported", "copy"] {
        let out = c.dir.path().join(format!("{name}.raw"));
        c.ctl_ok(&[
            "image",
            "export",
            &format!("vm-pool/{name}"),
            out.to_str().expect("utf8"),
        ]);
        assert!(
            std::fs::read(&out).expect("exported") == content,
            "{name} differs from the imported file"
        );
    }
    c.ctl_ok(&["image", "rm", "vm-pool/imported"]);
    c.ctl_ok(&["image", "rm", "vm-pool/copy"]);

    let ls = c.ctl_json(&["image", "ls", "vm-pool"]);
    assert_eq!(ls, serde_json::json!(["disk0"]));
    c.ctl_ok(&["image", "rm", "vm-pool/disk0"]);
    assert!(
        rt.block_on(client.list(pool)).expect("ls").is_empty(),
        "removal leaves nothing"
    );
    let gone = c.ctl(&["image", "info", "vm-pool/disk0"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NOT_FOUND"));
    let bad = c.ctl(&["image", "create", "no-slash", "--size", "1M"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("POOL/IMAGE"));
    c.check_logs();
}
