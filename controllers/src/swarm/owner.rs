//! Ownership of engine objects: the one place that knows berth's labels on Swarm services, networks,
//! secrets, configs and volumes, how to select this installation's objects with label filters, and
//! how to tell "ours" from "another installation's" from "nobody's". berth finds, diffs and collects
//! only what carries its labels, and never touches anything else.

use berth_api_types::names::labels;
use berth_api_types::Kind;
use std::collections::HashMap;

/// Engine labels as bollard hands them over.
pub type Labels = HashMap<String, String>;

/// Label filters for the engine's list calls (`{"label": ["k=v", ...]}`).
pub type Filters = HashMap<String, Vec<String>>;

/// "This berth installation, for objects of this kind": labels what a controller creates and
/// recognises it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    instance: String,
    kind: Kind,
}

/// Whose an engine object is, judged by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This installation, this kind, this object.
    Ours,
    /// This installation, but made for another object or kind: not this object's to touch.
    OursForSomethingElse,
    /// Another berth installation (its instance id).
    OtherInstallation(String),
    /// Nobody berth knows: created by hand or by another tool.
    Unmanaged,
}

impl Owner {
    pub fn new(instance: impl Into<String>, kind: Kind) -> Self {
        Owner {
            instance: instance.into(),
            kind,
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The same installation, another kind (e.g. the secrets a Service controller materialises).
    pub fn for_kind(&self, kind: Kind) -> Owner {
        Owner::new(self.instance.clone(), kind)
    }

    /// The labels that say "this installation owns this, for object `name` of this kind".
    pub fn labels(&self, name: &str) -> Labels {
        HashMap::from([
            (
                labels::MANAGED_BY.to_string(),
                labels::MANAGED_BY_VALUE.to_string(),
            ),
            (labels::INSTANCE.to_string(), self.instance.clone()),
            (labels::KIND.to_string(), self.kind.lower().to_string()),
            (labels::NAME.to_string(), name.to_string()),
        ])
    }

    /// [`labels`](Self::labels) plus more `(key, value)` pairs (a role, a key, a hash).
    pub fn labels_with(&self, name: &str, extra: &[(&str, &str)]) -> Labels {
        let mut l = self.labels(name);
        l.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        l
    }

    /// Filters selecting exactly this installation's objects of this kind; `name` narrows them to
    /// one object's, `extra` to those carrying more labels (e.g. a role).
    pub fn filters(&self, name: Option<&str>, extra: &[(&str, &str)]) -> Filters {
        let mut l = vec![
            format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
            format!("{}={}", labels::INSTANCE, self.instance),
            format!("{}={}", labels::KIND, self.kind.lower()),
        ];
        if let Some(n) = name {
            l.push(format!("{}={n}", labels::NAME));
        }
        l.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
        HashMap::from([("label".to_string(), l)])
    }

    /// Whose an object with these labels is, from the point of view of object `name`.
    pub fn claim(&self, l: Option<&Labels>, name: &str) -> Claim {
        let get = |k: &str| l.and_then(|l| l.get(k)).map(String::as_str);
        if get(labels::MANAGED_BY) != Some(labels::MANAGED_BY_VALUE) {
            return Claim::Unmanaged;
        }
        match get(labels::INSTANCE) {
            Some(i) if i == self.instance => {
                if get(labels::KIND) == Some(self.kind.lower()) && get(labels::NAME) == Some(name) {
                    Claim::Ours
                } else {
                    Claim::OursForSomethingElse
                }
            }
            Some(other) => Claim::OtherInstallation(other.to_string()),
            None => Claim::Unmanaged,
        }
    }

    /// Whether an object with these labels is this installation's, for object `name` of this kind.
    pub fn owns(&self, l: Option<&Labels>, name: &str) -> bool {
        self.claim(l, name) == Claim::Ours
    }

    /// Whether these labels say this installation made the object, whatever for. Enough for a
    /// content-addressed secret or config: the same name means the same content.
    pub fn same_installation(&self, l: Option<&Labels>) -> bool {
        let get = |k: &str| l.and_then(|l| l.get(k)).map(String::as_str);
        get(labels::MANAGED_BY) == Some(labels::MANAGED_BY_VALUE)
            && get(labels::INSTANCE) == Some(self.instance.as_str())
    }

    /// The berth object an engine object of this installation and kind was made for.
    pub fn object_of(&self, l: Option<&Labels>) -> Option<String> {
        let l = l?;
        (l.get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGED_BY_VALUE)
            && l.get(labels::INSTANCE) == Some(&self.instance)
            && l.get(labels::KIND).map(String::as_str) == Some(self.kind.lower()))
        .then(|| l.get(labels::NAME).cloned())
        .flatten()
    }

    /// Why berth will not create or change the engine `what` (service, network...) named `name`:
    /// an object it does not own has the name. For a status condition.
    pub fn refusal(&self, what: &str, name: &str, l: Option<&Labels>) -> String {
        match self.claim(l, name) {
            Claim::OtherInstallation(other) => format!(
                "a Swarm {what} named `{name}` belongs to another berth installation ({other}); berth leaves it alone"
            ),
            _ => format!(
                "a Swarm {what} named `{name}` exists that berth does not manage; berth leaves it alone — remove or rename it"
            ),
        }
    }
}

/// The labels of something berth runs for itself that belongs to no berth object's kind (an
/// exec agent), so no controller takes it for one of its own: this installation's, with a role and what it serves.
pub fn installation_labels(instance: &str, role: &str, name: &str) -> Labels {
    HashMap::from([
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_VALUE.to_string(),
        ),
        (labels::INSTANCE.to_string(), instance.to_string()),
        (labels::ROLE.to_string(), role.to_string()),
        (labels::NAME.to_string(), name.to_string()),
    ])
}

/// Filters selecting [`installation_labels`] of one role.
pub fn installation_filters(instance: &str, role: &str) -> Filters {
    HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE),
            format!("{}={instance}", labels::INSTANCE),
            format!("{}={role}", labels::ROLE),
        ],
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_filters_and_claims_agree() {
        let us = Owner::new("inst-a", Kind::Network);
        let l = us.labels("backend");
        assert_eq!(us.claim(Some(&l), "backend"), Claim::Ours);
        assert!(us.owns(Some(&l), "backend"));
        assert_eq!(us.object_of(Some(&l)).as_deref(), Some("backend"));
        assert_eq!(
            us.claim(Some(&l), "frontend"),
            Claim::OursForSomethingElse,
            "another object's network is not this object's"
        );
        assert_eq!(
            us.for_kind(Kind::Service).claim(Some(&l), "backend"),
            Claim::OursForSomethingElse
        );
        let them = Owner::new("inst-b", Kind::Network);
        assert_eq!(
            them.claim(Some(&l), "backend"),
            Claim::OtherInstallation("inst-a".into())
        );
        assert_eq!(them.object_of(Some(&l)), None);
        assert_eq!(us.claim(None, "backend"), Claim::Unmanaged);
        let mut forged = l.clone();
        forged.remove(labels::MANAGED_BY);
        assert_eq!(us.claim(Some(&forged), "backend"), Claim::Unmanaged);

        let f = us.filters(Some("backend"), &[(labels::ROLE, "proxy")]);
        let want: Vec<String> = l
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(["io.berth.role=proxy".to_string()])
            .collect();
        let mut got = f["label"].clone();
        got.sort();
        let mut want = want;
        want.sort();
        assert_eq!(got, want, "filters select exactly what labels mark");
    }

    #[test]
    fn refusals_name_the_owner() {
        let us = Owner::new("inst-a", Kind::Service);
        let theirs = Owner::new("inst-b", Kind::Service).labels("web");
        assert!(us
            .refusal("service", "web", Some(&theirs))
            .contains("another berth installation (inst-b)"));
        assert!(us
            .refusal("service", "web", None)
            .contains("berth does not manage"));
    }
}
