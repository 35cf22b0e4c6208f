//! Regenerates codecs/src/gen/orders.rs from codecs/schema/orders.proto with protox (no
//! protoc needed) and prost-build. Run through scripts/gen-codecs.sh.

fn main() {
    let root = std::env::args().nth(1).expect("usage: fluxgate-codegen REPO_ROOT");
    let schema = format!("{root}/codecs/schema");
    let out = format!("{root}/codecs/src/gen");
    let fds = protox::compile([format!("{schema}/orders.proto")], [schema.as_str()])
        .expect("orders.proto compiles");
    prost_build::Config::new()
        // bytes fields become bytes::Bytes: decoding from a Bytes buffer then borrows from it.
        .bytes(["."])
        .out_dir(&out)
        .compile_fds(fds)
        .expect("prost-build writes the code");
    std::fs::rename(format!("{out}/fluxgate.orders.rs"), format!("{out}/orders.rs"))
        .expect("rename generated file");
}
