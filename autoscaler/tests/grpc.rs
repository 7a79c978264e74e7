//! The externalgrpc service over mutual TLS on loopback, driven by a client generated from
//! the same .proto, against `FakePoolBackend`.

mod support;

use basalt_autoscaler::proto::externalgrpc as pb;
use basalt_autoscaler::proto::k8s::io::api::core::v1 as core;
use basalt_autoscaler::proto::k8s::io::apimachinery::pkg::apis::meta::v1 as meta;
use basalt_autoscaler::{InstanceState, NodeTemplate, OptionOverrides, Taint};
use prost::Message;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tonic::Code;

fn node(provider_id: &str) -> pb::ExternalGrpcNode {
    pb::ExternalGrpcNode {
        provider_id: provider_id.into(),
        name: provider_id.rsplit('/').next().unwrap_or_default().into(),
        ..Default::default()
    }
}

fn template() -> NodeTemplate {
    NodeTemplate {
        labels: BTreeMap::from([("basalt.io/pool".to_owned(), POOL.to_owned())]),
        taints: vec![Taint {
            key: "customer".into(),
            value: "a".into(),
            effect: "NoSchedule".into(),
        }],
        cpu: "2".into(),
        memory: "3838Mi".into(),
        pods: 110,
        arch: "amd64".into(),
    }
}

#[tokio::test]
async fn every_method_over_mutual_tls() {
    let pki = Pki::new();
    let ca = read(&pki.path("ca.pem"));
    let backend = Arc::new(FakePoolBackend::default());
    backend.add_running("a", "hcloud://1001");
    backend.with(|s| {
        s.templates.insert("a".into(), template());
        s.overrides.insert(
            "a".into(),
            OptionOverrides {
                max_node_provision: Some(Duration::from_secs(120)),
                ..Default::default()
            },
        );
    });
    let server = start(&pki, backend.clone()).await;
    let cert = pki.client("autoscaler-a");
    let mut c = client(server.addr, &ca, Some(&cert))
        .await
        .expect("connect");
    let id = "eu-a".to_owned();

    // NodeGroups: exactly the caller's group, with its limits.
    let groups = c
        .node_groups(pb::NodeGroupsRequest {})
        .await
        .expect("NodeGroups")
        .into_inner()
        .node_groups;
    assert_eq!(groups.len(), 1);
    assert_eq!(
        (
            groups[0].id.as_str(),
            groups[0].min_size,
            groups[0].max_size
        ),
        ("eu-a", 0, 5)
    );

    // NodeGroupForNode: its node is in the group; an unknown node and a node without a
    // provider id are not managed.
    let ng = |r: tonic::Response<pb::NodeGroupForNodeResponse>| {
        r.into_inner().node_group.expect("node group").id
    };
    let mine = c
        .node_group_for_node(pb::NodeGroupForNodeRequest {
            node: Some(node("hcloud://1001")),
        })
        .await
        .expect("NodeGroupForNode");
    assert_eq!(ng(mine), "eu-a");
    let unknown = c
        .node_group_for_node(pb::NodeGroupForNodeRequest {
            node: Some(node("hcloud://9999")),
        })
        .await
        .expect("NodeGroupForNode");
    assert_eq!(ng(unknown), "");
    let no_id = c
        .node_group_for_node(pb::NodeGroupForNodeRequest {
            node: Some(node("")),
        })
        .await
        .expect("NodeGroupForNode");
    assert_eq!(ng(no_id), "");

    // Pricing is optional and not offered: Unimplemented, as the protocol says.
    let e = c
        .pricing_node_price(pb::PricingNodePriceRequest {
            node: Some(node("hcloud://1001")),
            ..Default::default()
        })
        .await
        .expect_err("PricingNodePrice");
    assert_eq!(e.code(), Code::Unimplemented);
    let e = c
        .pricing_pod_price(pb::PricingPodPriceRequest::default())
        .await
        .expect_err("PricingPodPrice");
    assert_eq!(e.code(), Code::Unimplemented);

    // GPULabel, GetAvailableGPUTypes.
    let label = c
        .gpu_label(pb::GpuLabelRequest {})
        .await
        .expect("GPULabel")
        .into_inner()
        .label;
    assert_eq!(label, basalt_autoscaler::service::GPU_LABEL);
    let gpus = c
        .get_available_gpu_types(pb::GetAvailableGpuTypesRequest {})
        .await
        .expect("GetAvailableGPUTypes")
        .into_inner();
    assert!(gpus.gpu_types.is_empty());

    // Refresh reaches the backend.
    c.refresh(pb::RefreshRequest {}).await.expect("Refresh");
    c.refresh(pb::RefreshRequest {}).await.expect("Refresh");
    assert_eq!(backend.with(|s| s.refreshes), 2);

    // TargetSize reflects the backend: one running node.
    let size = |c: &mut pb::cloud_provider_client::CloudProviderClient<_>| {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.node_group_target_size(pb::NodeGroupTargetSizeRequest { id })
                .await
                .expect("NodeGroupTargetSize")
                .into_inner()
                .target_size
        }
    };
    assert_eq!(size(&mut c).await, 1);

    // IncreaseSize: the backend sees the delta, the target follows.
    c.node_group_increase_size(pb::NodeGroupIncreaseSizeRequest {
        delta: 3,
        id: id.clone(),
    })
    .await
    .expect("NodeGroupIncreaseSize");
    assert_eq!(
        backend.with(|s| s.increases.clone()),
        vec![("a".to_owned(), 3)]
    );
    assert_eq!(size(&mut c).await, 4);

    // Beyond max (5): refused before the backend is asked.
    let e = c
        .node_group_increase_size(pb::NodeGroupIncreaseSizeRequest {
            delta: 2,
            id: id.clone(),
        })
        .await
        .expect_err("above max");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .node_group_increase_size(pb::NodeGroupIncreaseSizeRequest {
            delta: 0,
            id: id.clone(),
        })
        .await
        .expect_err("zero delta");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(backend.with(|s| s.increases.len()), 1);

    // Nodes: provider ids and states, with error info where there is one.
    backend.with(|s| {
        let n = s
            .nodes
            .iter_mut()
            .find(|n| n.provider_id == "basalt-qemu://eu-3")
            .expect("third new node");
        n.error = Some(out_of_resources("no-standby"));
    });
    let instances = c
        .node_group_nodes(pb::NodeGroupNodesRequest { id: id.clone() })
        .await
        .expect("NodeGroupNodes")
        .into_inner()
        .instances;
    let listed: Vec<(String, pb::instance_status::InstanceState)> = instances
        .iter()
        .map(|i| {
            (
                i.id.clone(),
                i.status.as_ref().expect("status").instance_state(),
            )
        })
        .collect();
    use pb::instance_status::InstanceState as S;
    assert_eq!(
        listed,
        vec![
            ("hcloud://1001".to_owned(), S::InstanceRunning),
            ("basalt-qemu://eu-1".to_owned(), S::InstanceCreating),
            ("basalt-qemu://eu-2".to_owned(), S::InstanceCreating),
            ("basalt-qemu://eu-3".to_owned(), S::InstanceCreating),
        ]
    );
    let err = instances[3]
        .status
        .as_ref()
        .and_then(|s| s.error_info.as_ref())
        .expect("error info");
    assert_eq!(
        (err.error_code.as_str(), err.instance_error_class),
        ("no-standby", 1)
    );
    assert!(instances[0]
        .status
        .as_ref()
        .and_then(|s| s.error_info.as_ref())
        .is_none());

    // DecreaseTargetSize: negative delta, only not-yet-created nodes go.
    c.node_group_decrease_target_size(pb::NodeGroupDecreaseTargetSizeRequest {
        delta: -2,
        id: id.clone(),
    })
    .await
    .expect("NodeGroupDecreaseTargetSize");
    assert_eq!(
        backend.with(|s| s.decreases.clone()),
        vec![("a".to_owned(), 2)]
    );
    assert_eq!(size(&mut c).await, 2);
    let e = c
        .node_group_decrease_target_size(pb::NodeGroupDecreaseTargetSizeRequest {
            delta: 1,
            id: id.clone(),
        })
        .await
        .expect_err("positive delta");
    assert_eq!(e.code(), Code::InvalidArgument);
    // More than are being created: the backend's FailedPrecondition comes through.
    let e = c
        .node_group_decrease_target_size(pb::NodeGroupDecreaseTargetSizeRequest {
            delta: -2,
            id: id.clone(),
        })
        .await
        .expect_err("would delete running nodes");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // DeleteNodes: the node goes to Deleting and leaves the target.
    c.node_group_delete_nodes(pb::NodeGroupDeleteNodesRequest {
        nodes: vec![node("hcloud://1001")],
        id: id.clone(),
    })
    .await
    .expect("NodeGroupDeleteNodes");
    assert_eq!(
        backend.with(|s| s.deletes.clone()),
        vec![("a".to_owned(), vec!["hcloud://1001".to_owned()])]
    );
    assert_eq!(size(&mut c).await, 1);
    let states: Vec<InstanceState> = backend.with(|s| s.nodes.iter().map(|n| n.state).collect());
    assert_eq!(states[0], InstanceState::Deleting);
    let e = c
        .node_group_delete_nodes(pb::NodeGroupDeleteNodesRequest {
            nodes: vec![node("hcloud://424242")],
            id: id.clone(),
        })
        .await
        .expect_err("unknown node");
    assert_eq!(e.code(), Code::NotFound);

    // TemplateNodeInfo: a Node with the labels, taints and capacity, in both the old
    // (message) and the new (bytes) field, which carry the same Node.
    let t = c
        .node_group_template_node_info(pb::NodeGroupTemplateNodeInfoRequest { id: id.clone() })
        .await
        .expect("NodeGroupTemplateNodeInfo")
        .into_inner();
    let from_bytes = core::Node::decode(t.node_bytes.as_slice()).expect("nodeBytes is a Node");
    let n = t.node_info.expect("nodeInfo");
    assert_eq!(from_bytes, n);
    let labels = &n.metadata.as_ref().expect("metadata").labels;
    assert_eq!(labels.get("basalt.io/pool").map(String::as_str), Some("eu"));
    assert_eq!(
        labels.get("kubernetes.io/os").map(String::as_str),
        Some("linux")
    );
    assert_eq!(
        labels.get("kubernetes.io/arch").map(String::as_str),
        Some("amd64")
    );
    let spec = n.spec.as_ref().expect("spec");
    assert_eq!(
        spec.taints
            .iter()
            .map(|t| (t.key.as_str(), t.value.as_str(), t.effect.as_str()))
            .collect::<Vec<_>>(),
        vec![("customer", "a", "NoSchedule")]
    );
    let status = n.status.as_ref().expect("status");
    let cap = |k: &str| status.capacity.get(k).map(|q| q.string.clone());
    assert_eq!(cap("cpu").as_deref(), Some("2"));
    assert_eq!(cap("memory").as_deref(), Some("3838Mi"));
    assert_eq!(cap("pods").as_deref(), Some("110"));
    assert_eq!(status.allocatable, status.capacity);
    assert!(status
        .conditions
        .iter()
        .any(|c| c.r#type == "Ready" && c.status == "True"));

    // GetOptions, as an older autoscaler asks (apimachinery durations in 3, 4, 5): the
    // defaults come back with basalt's override, in both generations' fields.
    let old_defaults = pb::NodeGroupAutoscalingOptions {
        scale_down_utilization_threshold: 0.5,
        scale_down_gpu_utilization_threshold: 0.6,
        scale_down_unneeded_time: Some(meta::Duration {
            duration: 600_000_000_000,
        }),
        scale_down_unready_time: Some(meta::Duration {
            duration: 1_200_000_000_000,
        }),
        max_node_provision_time: Some(meta::Duration {
            duration: 900_000_000_000,
        }),
        ..Default::default()
    };
    let o = c
        .node_group_get_options(pb::NodeGroupAutoscalingOptionsRequest {
            id: id.clone(),
            defaults: Some(old_defaults),
        })
        .await
        .expect("NodeGroupGetOptions")
        .into_inner()
        .node_group_autoscaling_options
        .expect("options");
    assert_eq!(o.scale_down_utilization_threshold, 0.5);
    assert_eq!(o.scale_down_gpu_utilization_threshold, 0.6);
    assert_eq!(
        o.scale_down_unneeded_time.map(|d| d.duration),
        Some(600_000_000_000)
    );
    assert_eq!(
        o.scale_down_unready_time.map(|d| d.duration),
        Some(1_200_000_000_000)
    );
    assert_eq!(
        o.max_node_provision_time.map(|d| d.duration),
        Some(120_000_000_000)
    );
    assert_eq!(o.scale_down_unneeded_duration.map(|d| d.seconds), Some(600));
    assert_eq!(o.max_node_provision_duration.map(|d| d.seconds), Some(120));
    // As a newer autoscaler asks (google.protobuf durations in 8..11).
    let new_defaults = pb::NodeGroupAutoscalingOptions {
        scale_down_unneeded_duration: Some(prost_types::Duration {
            seconds: 300,
            nanos: 0,
        }),
        max_node_startup_duration: Some(prost_types::Duration {
            seconds: 900,
            nanos: 0,
        }),
        zero_or_max_node_scaling: true,
        ..Default::default()
    };
    let o = c
        .node_group_get_options(pb::NodeGroupAutoscalingOptionsRequest {
            id: id.clone(),
            defaults: Some(new_defaults),
        })
        .await
        .expect("NodeGroupGetOptions")
        .into_inner()
        .node_group_autoscaling_options
        .expect("options");
    assert_eq!(
        o.scale_down_unneeded_time.map(|d| d.duration),
        Some(300_000_000_000)
    );
    assert_eq!(o.max_node_startup_duration.map(|d| d.seconds), Some(900));
    assert!(o.zero_or_max_node_scaling);

    // Cleanup.
    c.cleanup(pb::CleanupRequest {}).await.expect("Cleanup");

    // A group with no template configured: Unimplemented, which the autoscaler reads as
    // ErrNotImplemented.
    backend.with(|s| s.templates.clear());
    let e = c
        .node_group_template_node_info(pb::NodeGroupTemplateNodeInfoRequest { id })
        .await
        .expect_err("no template");
    assert_eq!(e.code(), Code::Unimplemented);

    drop(c);
    server
        .stop()
        .await
        .expect("serve returns Ok after shutdown");
}

#[tokio::test]
async fn a_cluster_cannot_see_grow_or_delete_another_clusters_nodes() {
    let pki = Pki::new();
    let ca = read(&pki.path("ca.pem"));
    let backend = Arc::new(FakePoolBackend::default());
    backend.add_running("a", "hcloud://1");
    backend.add_running("a", "hcloud://2");
    backend.add_running("b", "hcloud://3");
    let server = start(&pki, backend.clone()).await;
    let mut b = client(server.addr, &ca, Some(&pki.client("autoscaler-b")))
        .await
        .expect("connect");

    // Only its own group exists for B.
    let groups = b
        .node_groups(pb::NodeGroupsRequest {})
        .await
        .expect("NodeGroups")
        .into_inner()
        .node_groups;
    assert_eq!(
        groups.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        vec!["eu-b"]
    );

    // A's node is not managed, as far as B's autoscaler is told; B's own node is.
    let group_of = |b: &mut pb::cloud_provider_client::CloudProviderClient<_>, id: &str| {
        let mut b = b.clone();
        let req = pb::NodeGroupForNodeRequest {
            node: Some(node(id)),
        };
        async move {
            b.node_group_for_node(req)
                .await
                .expect("NodeGroupForNode")
                .into_inner()
                .node_group
                .expect("group")
                .id
        }
    };
    assert_eq!(group_of(&mut b, "hcloud://1").await, "");
    assert_eq!(group_of(&mut b, "hcloud://3").await, "eu-b");

    // Listing, sizing and growing A's group: NotFound, and the backend is not asked.
    let e = b
        .node_group_nodes(pb::NodeGroupNodesRequest { id: "eu-a".into() })
        .await
        .expect_err("list A");
    assert_eq!(e.code(), Code::NotFound);
    let e = b
        .node_group_target_size(pb::NodeGroupTargetSizeRequest { id: "eu-a".into() })
        .await
        .expect_err("size of A");
    assert_eq!(e.code(), Code::NotFound);
    let e = b
        .node_group_increase_size(pb::NodeGroupIncreaseSizeRequest {
            delta: 1,
            id: "eu-a".into(),
        })
        .await
        .expect_err("grow A");
    assert_eq!(e.code(), Code::NotFound);
    let e = b
        .node_group_template_node_info(pb::NodeGroupTemplateNodeInfoRequest { id: "eu-a".into() })
        .await
        .expect_err("template of A");
    assert_eq!(e.code(), Code::NotFound);

    // Deleting A's node through A's group id: NotFound; through its own group id:
    // PermissionDenied, and nothing at all is deleted, not even B's own node in the same
    // request.
    let e = b
        .node_group_delete_nodes(pb::NodeGroupDeleteNodesRequest {
            nodes: vec![node("hcloud://1")],
            id: "eu-a".into(),
        })
        .await
        .expect_err("delete via A's id");
    assert_eq!(e.code(), Code::NotFound);
    let e = b
        .node_group_delete_nodes(pb::NodeGroupDeleteNodesRequest {
            nodes: vec![node("hcloud://3"), node("hcloud://2")],
            id: "eu-b".into(),
        })
        .await
        .expect_err("delete A's node via own id");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        backend.untouched(),
        "{:?}",
        backend.with(|s| s.deletes.clone())
    );
    assert!(backend.with(|s| s.nodes.iter().all(|n| n.state == InstanceState::Running)));

    // B's own list has only B's node.
    let mine = b
        .node_group_nodes(pb::NodeGroupNodesRequest { id: "eu-b".into() })
        .await
        .expect("list own")
        .into_inner()
        .instances;
    assert_eq!(
        mine.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        vec!["hcloud://3"]
    );

    // And A still sees its two.
    let mut a = client(server.addr, &ca, Some(&pki.client("autoscaler-a")))
        .await
        .expect("connect A");
    let theirs = a
        .node_group_nodes(pb::NodeGroupNodesRequest { id: "eu-a".into() })
        .await
        .expect("A lists")
        .into_inner()
        .instances;
    assert_eq!(theirs.len(), 2);
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused() {
    let pki = Pki::new();
    let ca = read(&pki.path("ca.pem"));
    let backend = Arc::new(FakePoolBackend::default());
    backend.add_running("a", "hcloud://1");
    let server = start(&pki, backend.clone()).await;

    // Same CN as cluster A's autoscaler, signed by another CA.
    let forged = pki.issue_with(
        &pki.other_ca,
        "autoscaler-a",
        basalt_client::pki::Role::Client,
    );
    // The client may finish its side of a TLS 1.3 handshake before the server rejects its
    // certificate, so the refusal shows either at connect or at the first call.
    let refused = match client(server.addr, &ca, Some(&forged)).await {
        Err(_) => true,
        Ok(mut c) => c
            .node_group_increase_size(pb::NodeGroupIncreaseSizeRequest {
                delta: 1,
                id: "eu-a".into(),
            })
            .await
            .is_err(),
    };
    assert!(refused, "a certificate of another CA got through");

    // No certificate at all: refused as well.
    let refused = match client(server.addr, &ca, None).await {
        Err(_) => true,
        Ok(mut c) => c.node_groups(pb::NodeGroupsRequest {}).await.is_err(),
    };
    assert!(refused, "a client without a certificate got through");
    assert!(backend.untouched());

    // The handshake itself fails: a raw TLS client with the forged certificate gets the
    // server's alert instead of any HTTP/2 bytes.
    let alert = raw_tls_read(server.addr, &ca, &forged).await;
    assert!(
        alert.is_err(),
        "the server answered a forged certificate: {alert:?}"
    );

    // A certificate of the pool CA without the clientAuth usage (the server's own, a
    // node certificate) is refused as a client certificate too.
    let server_cert = basalt_client::pki::Issued {
        cert_pem: read(&pki.path("server.pem")),
        key_pem: read(&pki.path("server.key")),
    };
    let alert = raw_tls_read(server.addr, &ca, &server_cert).await;
    assert!(
        alert.is_err(),
        "a serverAuth certificate was accepted: {alert:?}"
    );

    // A client that opens a connection and never handshakes holds up no one.
    let _silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("tcp");

    // The real certificate still works on the same server.
    let mut good = client(server.addr, &ca, Some(&pki.client("autoscaler-a")))
        .await
        .expect("connect");
    good.node_groups(pb::NodeGroupsRequest {})
        .await
        .expect("NodeGroups with the pool CA's certificate");
}

/// Handshakes with rustls directly and reads: Ok(bytes) if the server sent anything after
/// the handshake, Err if the handshake or the read failed.
async fn raw_tls_read(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    cert: &basalt_client::pki::Issued,
) -> Result<usize, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("add ca");
    }
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("cert pem");
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key pem");
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client cert");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // The HTTP/2 preface; a server that accepted us answers with its SETTINGS frame.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test]
async fn the_raw_tls_probe_can_succeed() {
    // The probe above must be able to tell a refusal from an acceptance.
    let pki = Pki::new();
    let ca = read(&pki.path("ca.pem"));
    let server = start(&pki, Arc::new(FakePoolBackend::default())).await;
    let good = pki.client("autoscaler-a");
    let n = raw_tls_read(server.addr, &ca, &good)
        .await
        .expect("accepted");
    assert!(n > 0);
}

#[tokio::test]
async fn a_certificate_of_no_cluster_is_permission_denied() {
    let pki = Pki::new();
    let ca = read(&pki.path("ca.pem"));
    let backend = Arc::new(FakePoolBackend::default());
    let server = start(&pki, backend.clone()).await;
    let mut c = client(server.addr, &ca, Some(&pki.client("stranger")))
        .await
        .expect("the handshake succeeds: the certificate is the pool CA's");
    let e = c
        .node_groups(pb::NodeGroupsRequest {})
        .await
        .expect_err("no cluster");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("stranger"), "{}", e.message());
    let e = c
        .node_group_increase_size(pb::NodeGroupIncreaseSizeRequest {
            delta: 1,
            id: "eu-a".into(),
        })
        .await
        .expect_err("no cluster");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(backend.untouched());
}

#[tokio::test]
async fn a_missing_tls_file_is_named() {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut paths = pki.tls_paths();
    paths.client_ca = pki.path("no-such-ca.pem");
    let e = basalt_autoscaler::serve(
        listener,
        &paths,
        identities(),
        Arc::new(FakePoolBackend::default()),
        async {},
    )
    .await
    .expect_err("missing file");
    let text = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(text.contains("no-such-ca.pem"), "{text}");

    // A key file that holds a certificate: named, and the message says what is wrong.
    let mut paths = pki.tls_paths();
    paths.key = pki.path("server.pem");
    let e = paths.server_config().expect_err("not a key");
    assert!(e.to_string().contains("server.pem"), "{e}");
}

#[test]
fn openssl_verifies_the_chains() {
    // An independent check of the certificates the tests use: openssl's verifier accepts
    // the pool CA's server and client certificates for their purposes, and refuses a
    // certificate of the other CA.
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        // As the project's other prerequisites: never a silent pass under CI.
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs openssl (scripts/install-host-tools installs it)"
        );
        eprintln!("openssl not installed; skipped");
        return;
    }
    let pki = Pki::new();
    pki.client("autoscaler-a");
    let forged = pki.issue_with(
        &pki.other_ca,
        "autoscaler-a",
        basalt_client::pki::Role::Client,
    );
    pki.write("forged", &forged);
    let verify = |purpose: &str, file: &str| {
        let out = std::process::Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(pki.path("ca.pem"))
            .arg(pki.path(file))
            .output()
            .expect("run openssl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = verify("sslserver", "server.pem");
    assert!(ok, "{text}");
    let (ok, text) = verify("sslclient", "autoscaler-a.pem");
    assert!(ok, "{text}");
    let (ok, text) = verify("sslclient", "forged.pem");
    assert!(!ok, "openssl accepted the other CA's certificate: {text}");
}
