//! Rollout bookkeeping: the revision history in a Service's status. Pure: the reconcile says what
//! it sent to the engine and what the engine reports, and gets back the history to write.
//!
//! A revision is one distinct thing the tasks run: the spec's image, the digest berth pinned it to
//! and the forced-redeploy counter. Other spec changes (replicas, env...) roll tasks too, but are not
//! what `berth rollout undo` goes back to, so they do not make revisions.

use berth_api_types::names::annotations;
use berth_api_types::service::{Revision, RolloutResult, REVISION_HISTORY};
use berth_api_types::ObjectMeta;
use chrono::{DateTime, Utc};

/// What berth just sent to the engine.
pub struct Sent<'a> {
    pub generation: u64,
    pub image: &'a str,
    pub digest: Option<&'a str>,
    pub force_update: u64,
    pub trigger: &'a str,
    pub deploy_id: Option<&'a str>,
    pub now: DateTime<Utc>,
}

/// The history after a write: unchanged when the tasks run the same thing as the latest revision
/// (a replicas change, a drift repair), else with a new revision, the previous one superseded if it
/// had not finished.
pub fn record(revisions: &[Revision], sent: &Sent) -> Vec<Revision> {
    let mut out = revisions.to_vec();
    if let Some(last) = out.last() {
        if last.image == sent.image
            && last.digest.as_deref() == sent.digest
            && last.force_update == sent.force_update
        {
            return out;
        }
    }
    let number = out.last().map_or(1, |r| r.revision + 1);
    if let Some(last) = out.last_mut() {
        if last.result == RolloutResult::Progressing {
            last.result = RolloutResult::Superseded;
        }
    }
    out.push(Revision {
        revision: number,
        image: sent.image.to_string(),
        digest: sent.digest.map(str::to_string),
        generation: sent.generation,
        force_update: sent.force_update,
        time: sent.now,
        trigger: sent.trigger.to_string(),
        deploy_id: sent.deploy_id.map(str::to_string),
        result: RolloutResult::Progressing,
        message: None,
    });
    let excess = out.len().saturating_sub(REVISION_HISTORY);
    out.drain(..excess);
    out
}

/// What the engine says about the latest rollout.
pub struct Progress<'a> {
    /// Swarm's update state (`updating`, `completed`, `paused`, `rollback_completed`, ...).
    pub update_state: Option<&'a str>,
    pub update_message: Option<&'a str>,
    /// Every desired task runs the current task spec.
    pub all_updated: bool,
}

/// Settles the latest revision once the engine has finished with it.
pub fn observe(revisions: &mut [Revision], p: &Progress) {
    let Some(last) = revisions.last_mut() else {
        return;
    };
    if last.result != RolloutResult::Progressing {
        return;
    }
    let result = match p.update_state {
        // Settled once the engine is done going back, so "rolled back" means the old tasks run.
        Some("rollback_completed") => RolloutResult::RolledBack,
        Some("paused" | "rollback_paused") => RolloutResult::Paused,
        Some("updating" | "rollback_started") => return,
        // `completed`, or no update state (a create, or an update the engine has not picked up yet:
        // then the old tasks do not count as updated).
        _ if p.all_updated => RolloutResult::Complete,
        _ => return,
    };
    last.result = result;
    last.message = p
        .update_message
        .filter(|m| !m.is_empty() && result.failed())
        .map(str::to_string);
}

/// What asked for the current generation: the deploy that wrote it (its annotations name the
/// generation they produced), else a plain API write.
pub fn trigger(meta: &ObjectMeta) -> (String, Option<String>) {
    let a = &meta.annotations;
    let from_deploy = a
        .get(annotations::DEPLOY_GENERATION)
        .and_then(|g| g.parse::<u64>().ok())
        == Some(meta.generation);
    match (from_deploy, a.get(annotations::DEPLOY_SOURCE)) {
        (true, Some(source)) => (source.clone(), a.get(annotations::DEPLOY_ID).cloned()),
        _ => ("api".to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn sent(generation: u64, image: &str, force: u64) -> Sent<'_> {
        Sent {
            generation,
            image,
            digest: None,
            force_update: force,
            trigger: "api",
            deploy_id: None,
            now: t(generation as i64),
        }
    }

    fn done(all_updated: bool, state: Option<&str>) -> Progress<'_> {
        Progress {
            update_state: state,
            update_message: Some("update rolled back due to failure"),
            all_updated,
        }
    }

    #[test]
    fn a_revision_per_distinct_image_or_redeploy() {
        let h = record(&[], &sent(1, "app:1", 0));
        assert_eq!((h.len(), h[0].revision), (1, 1));
        // A replicas change (new generation, same image): no new revision.
        let h = record(&h, &sent(2, "app:1", 0));
        assert_eq!(h.len(), 1);
        let h = record(&h, &sent(3, "app:2", 0));
        assert_eq!(
            (h.len(), h[1].revision, h[0].result),
            (2, 2, RolloutResult::Superseded)
        );
        // A forced redeploy of the same tag is a rollout of its own.
        let h = record(&h, &sent(4, "app:2", 1));
        assert_eq!((h.len(), h[2].force_update), (3, 1));
    }

    #[test]
    fn the_history_is_bounded_and_numbers_keep_counting() {
        let mut h = Vec::new();
        for i in 1..=25u64 {
            let image = format!("app:{i}");
            h = record(&h, &sent(i, &image, 0));
        }
        assert_eq!(h.len(), REVISION_HISTORY);
        assert_eq!(h.first().unwrap().revision, 16);
        assert_eq!(h.last().unwrap().revision, 25);
    }

    #[test]
    fn results_follow_the_engine() {
        let mut h = record(&[], &sent(1, "app:1", 0));
        observe(&mut h, &done(false, None));
        assert_eq!(
            h[0].result,
            RolloutResult::Progressing,
            "old tasks still run"
        );
        observe(&mut h, &done(false, Some("updating")));
        assert_eq!(h[0].result, RolloutResult::Progressing);
        observe(&mut h, &done(true, Some("completed")));
        assert_eq!(
            (h[0].result, h[0].message.as_deref()),
            (RolloutResult::Complete, None)
        );

        let mut h = record(&h, &sent(2, "app:2", 0));
        observe(&mut h, &done(true, Some("rollback_started")));
        assert_eq!(h[1].result, RolloutResult::Progressing, "still going back");
        observe(&mut h, &done(true, Some("rollback_completed")));
        assert_eq!(h[1].result, RolloutResult::RolledBack);
        assert_eq!(
            h[1].message.as_deref(),
            Some("update rolled back due to failure")
        );
        // Settled results do not change again.
        observe(&mut h, &done(true, Some("completed")));
        assert_eq!(h[1].result, RolloutResult::RolledBack);

        let mut h = record(&h, &sent(3, "app:3", 0));
        observe(&mut h, &done(false, Some("paused")));
        assert!(h[2].result.failed());
    }

    #[test]
    fn trigger_comes_from_the_deploy_that_wrote_the_generation() {
        let mut meta = ObjectMeta {
            generation: 4,
            ..Default::default()
        };
        assert_eq!(trigger(&meta), ("api".to_string(), None));
        meta.annotations
            .insert(annotations::DEPLOY_SOURCE.into(), "webhook".into());
        meta.annotations
            .insert(annotations::DEPLOY_ID.into(), "01J0".into());
        meta.annotations
            .insert(annotations::DEPLOY_GENERATION.into(), "4".into());
        assert_eq!(trigger(&meta), ("webhook".to_string(), Some("01J0".into())));
        // A later API write (generation 5) is the API's, whatever the annotations still say.
        meta.generation = 5;
        assert_eq!(trigger(&meta).0, "api");
    }
}
