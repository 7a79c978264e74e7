//! Generates the gRPC server and client from proto/ with protox (a Rust proto compiler, so
//! no protoc is needed on the build host) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/externalgrpc.proto",
        "proto/k8s/core.proto",
        "proto/k8s/apimachinery.proto",
        "proto/k8s/resource.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(["externalgrpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .include_file("protos.rs")
        .compile_fds(fds)?;
    Ok(())
}
