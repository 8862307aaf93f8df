//! Node: one machine of the Swarm. berth registers one object per node it finds (named by the
//! node's hostname when that is unique, else by its ID); teams set the optional `spec` fields to
//! move the manager role, drain a node for maintenance, or label it to steer placement. A field
//! left out is left as the engine has it.

use crate::meta::Object;
use crate::names::labels;
use crate::validate::{check_envelope, Errors, FieldError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type Node = Object<NodeSpec, serde_json::Value>;

/// A node's Swarm role.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    Manager,
    Worker,
}

/// Whether the scheduler may place tasks on a node: `active` yes, `pause` no new tasks (running
/// ones stay), `drain` no tasks at all (running ones are moved to other nodes).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Manager => "manager",
            NodeRole::Worker => "worker",
        }
    }
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<Availability>,
    /// Node labels berth keeps on the node (placement constraints: `node.labels.KEY == VALUE`).
    /// Labels set by hand under other keys are left alone; a key removed from here is removed from
    /// the node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Node label keys a spec may set: anything but berth's reserved prefix, except the one label berth
/// reads from nodes (`io.berth.ingress`, the nodes that run the ingress proxy).
fn check_node_label_key(errors: &mut Errors, key: &str) {
    if key == labels::INGRESS_NODE {
        return;
    }
    crate::validate::check_label_key(errors, "spec.labels", key);
}

pub fn validate_node(n: &Node) -> Result<(), Vec<FieldError>> {
    let mut errors = Errors::default();
    check_envelope(&mut errors, &n.api_version, &n.metadata);
    for (key, value) in &n.spec.labels {
        check_node_label_key(&mut errors, key);
        if key == labels::INGRESS_NODE && value != "true" && value != "false" {
            errors.add(
                format!("spec.labels.{key}"),
                format!("must be `true` or `false`, not `{value}`"),
            );
        }
    }
    errors.into_result()
}

#[cfg(test)]
mod tests {
    use crate::typed::decode_object;
    use serde_json::json;

    fn node(spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "berth/v1", "kind": "Node", "metadata": {"name": "node-1"}, "spec": spec})
    }

    fn errors(spec: serde_json::Value) -> Vec<String> {
        decode_object(&node(spec))
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn every_field_is_optional() {
        let obj = decode_object(&node(json!({}))).unwrap();
        assert_eq!(obj.spec, json!({}));
        let obj = decode_object(&node(
            json!({"role": "manager", "availability": "drain", "labels": {"zone": "a"}}),
        ))
        .unwrap();
        assert_eq!(obj.spec["role"], "manager");
        assert_eq!(obj.spec["availability"], "drain");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = errors(json!({"role": "boss"}));
        assert!(e[0].starts_with("spec.role"), "{e:?}");
        assert!(e[0].contains("manager"), "{e:?}");
        let e = errors(json!({"availability": "off"}));
        assert!(e[0].starts_with("spec.availability"), "{e:?}");
        let e = errors(json!({"drain": true}));
        assert!(e[0].contains("drain"), "{e:?}");
    }

    #[test]
    fn reserved_label_keys_except_the_ingress_label() {
        let e = errors(json!({"labels": {"io.berth.instance": "x"}}));
        assert!(e[0].contains("reserved for berth"), "{e:?}");
        assert!(errors(json!({"labels": {"io.berth.ingress": "true"}})).is_empty());
        let e = errors(json!({"labels": {"io.berth.ingress": "yes"}}));
        assert_eq!(
            e,
            ["spec.labels.io.berth.ingress: must be `true` or `false`, not `yes`"]
        );
    }
}
