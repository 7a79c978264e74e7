//! The wire format against bytes written by hand from the published field numbers
//! (externalgrpc.proto and Kubernetes' generated.proto), independent of our .proto: a
//! renumbered field fails here.

use basalt_autoscaler::proto::externalgrpc as pb;
use basalt_autoscaler::proto::k8s::io::apimachinery::pkg::apis::meta::v1 as meta;
use basalt_autoscaler::service::{apply_overrides, template_node};
use basalt_autoscaler::{NodeTemplate, OptionOverrides};
use prost::Message;
use std::collections::BTreeMap;
use std::time::Duration;

#[test]
fn requests_decode_from_published_field_numbers() {
    // NodeGroupIncreaseSizeRequest: delta = 1 (varint), id = 2 (string).
    let r = pb::NodeGroupIncreaseSizeRequest::decode(&[0x08, 0x03, 0x12, 0x01, b'g'][..])
        .expect("decode");
    assert_eq!((r.delta, r.id.as_str()), (3, "g"));
    // NodeGroupDecreaseTargetSizeRequest: delta -2 is a 10-byte varint.
    let mut bytes = vec![0x08];
    bytes.extend([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    bytes.extend([0x12, 0x01, b'g']);
    let r = pb::NodeGroupDecreaseTargetSizeRequest::decode(&bytes[..]).expect("decode");
    assert_eq!(r.delta, -2);
    // NodeGroupDeleteNodesRequest: nodes = 1 (ExternalGrpcNode: providerID = 1, name = 2).
    let node = [0x0a, 0x03, b'q', b':', b'1', 0x12, 0x01, b'n'];
    let mut bytes = vec![0x0a, node.len() as u8];
    bytes.extend(node);
    bytes.extend([0x12, 0x01, b'g']);
    let r = pb::NodeGroupDeleteNodesRequest::decode(&bytes[..]).expect("decode");
    assert_eq!(r.nodes[0].provider_id, "q:1");
    assert_eq!(r.nodes[0].name, "n");
    assert_eq!(r.id, "g");
}

#[test]
fn instances_encode_with_published_field_numbers() {
    let r = pb::NodeGroupNodesResponse {
        instances: vec![pb::Instance {
            id: "x".into(),
            status: Some(pb::InstanceStatus {
                instance_state: pb::instance_status::InstanceState::InstanceCreating as i32,
                error_info: None,
            }),
        }],
    };
    // instances = 1 { id = 1 "x", status = 2 { instanceState = 1: 2 } }
    assert_eq!(
        r.encode_to_vec(),
        vec![0x0a, 0x07, 0x0a, 0x01, b'x', 0x12, 0x02, 0x08, 0x02]
    );
}

#[test]
fn options_carry_both_duration_generations() {
    // An older autoscaler's defaults: scaleDownUnneededTime = 3 { duration = 1: 5 ns }.
    let old =
        pb::NodeGroupAutoscalingOptions::decode(&[0x1a, 0x02, 0x08, 0x05][..]).expect("decode");
    assert_eq!(
        old.scale_down_unneeded_time,
        Some(meta::Duration { duration: 5 })
    );
    let out = apply_overrides(
        old,
        &OptionOverrides {
            max_node_provision: Some(Duration::from_secs(2)),
            ..Default::default()
        },
    );
    let bytes = out.encode_to_vec();
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    // Field 3 (old, 5 ns) and field 8 (google Duration { nanos = 2: 5 }).
    assert!(has(&[0x1a, 0x02, 0x08, 0x05]), "{bytes:02x?}");
    assert!(has(&[0x42, 0x02, 0x10, 0x05]), "{bytes:02x?}");
    // Field 5 (old, 2 s = 2_000_000_000 ns) and field 10 (google Duration { seconds = 1: 2 }).
    assert!(
        has(&[0x2a, 0x06, 0x08, 0x80, 0xa8, 0xd6, 0xb9, 0x07]),
        "{bytes:02x?}"
    );
    assert!(has(&[0x52, 0x02, 0x08, 0x02]), "{bytes:02x?}");
    // Field 4 / 9 (unready) present although neither default nor override set it: an
    // older autoscaler dereferences it.
    assert!(out.scale_down_unready_time.is_some() && out.scale_down_unready_duration.is_some());
}

#[test]
fn the_template_node_has_kubernetes_field_numbers() {
    let t = NodeTemplate {
        labels: BTreeMap::new(),
        taints: vec![],
        cpu: "2".into(),
        memory: "1Gi".into(),
        pods: 110,
        arch: "amd64".into(),
    };
    let node = template_node("g", &t);
    let bytes = node.encode_to_vec();
    // Node.metadata = 1, ObjectMeta.name = 1 ("g-template").
    assert_eq!(&bytes[2..4], &[0x0a, 0x0a]);
    assert_eq!(&bytes[4..14], b"g-template");
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    // ObjectMeta.labels = 11 (tag 0x5a) with the entry kubernetes.io/os=linux.
    let mut entry = vec![0x0a, 16];
    entry.extend(b"kubernetes.io/os");
    entry.extend([0x12, 5]);
    entry.extend(b"linux");
    let mut label = vec![0x5a, entry.len() as u8];
    label.extend(&entry);
    assert!(has(&label), "{bytes:02x?}");
    // NodeStatus.capacity = 1: entry { key = 1 "cpu", value = 2 Quantity { string = 1 "2" } }.
    let cpu = [
        0x0a, 0x0a, 0x0a, 0x03, b'c', b'p', b'u', 0x12, 0x03, 0x0a, 0x01, b'2',
    ];
    assert!(has(&cpu), "{bytes:02x?}");
    // The same entry as allocatable = 2.
    let mut alloc = cpu;
    alloc[0] = 0x12;
    assert!(has(&alloc), "{bytes:02x?}");
}
