//! The Conductor's part of replication: choosing leaders. Pure functions
//! over the metastore node; the caller writes the result by
//! compare-and-set on the version it read.

use super::{Epoch, GroupState, Member, Offset};

/// A replica whose worker holds a live metastore session, as it registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub member: Member,
    /// The replica lost data it once held (a wiped directory): never elected
    /// until it is back in the ISR through catch-up.
    pub lost_data: bool,
    /// The epoch of its last entry and its log end (the longest log wins,
    /// so fewer entries are truncated; any intact ISR member is safe).
    pub last_epoch: Epoch,
    pub log_end: Offset,
}

/// The next state when the leader's session is gone: the intact live ISR
/// member with the longest log leads a new epoch, and the old leader moves
/// to the OSR (it returns through catch-up). With no such member the group
/// has no leader (a new epoch all the same, so nothing of the old one is
/// applied any more) and stays so until an ISR member returns: an OSR
/// replica is never elected, even if it means waiting. `None` when nothing
/// changes.
pub fn elect(state: &GroupState, live: &[Candidate]) -> Option<GroupState> {
    if state
        .leader
        .is_some_and(|leader| live.iter().any(|c| c.member == leader))
    {
        return None;
    }
    let chosen = live
        .iter()
        .filter(|c| !c.lost_data && state.in_isr(c.member.id))
        .max_by_key(|c| (c.last_epoch, c.log_end, std::cmp::Reverse(c.member.id)));
    let Some(chosen) = chosen else {
        // Without a leader already, nothing changes; otherwise fence it.
        state.leader?;
        let mut next = state.clone();
        next.leader = None;
        next.epoch += 1;
        return Some(next);
    };
    let mut next = match state.leader {
        Some(old) if old.id != chosen.member.id => state.moved(old.id, false),
        _ => state.clone(),
    };
    next.leader = Some(chosen.member);
    next.epoch += 1;
    Some(next)
}

/// A graceful move of leadership (leadership balancing) to `to`, which
/// must be a live, intact ISR member: a new epoch, the old leader stays in
/// the ISR as a follower (it holds everything). `None` if `to` cannot lead.
pub fn hand_off(state: &GroupState, to: &Candidate) -> Option<GroupState> {
    if to.lost_data || !state.in_isr(to.member.id) || state.leader == Some(to.member) {
        return None;
    }
    let mut next = state.clone();
    next.leader = Some(to.member);
    next.epoch += 1;
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u32, incarnation: u64) -> Member {
        Member { id, incarnation }
    }

    fn candidate(id: u32, incarnation: u64, log_end: Offset) -> Candidate {
        Candidate {
            member: member(id, incarnation),
            lost_data: false,
            last_epoch: 1,
            log_end,
        }
    }

    fn led_by(leader: Member) -> GroupState {
        GroupState {
            version: 3,
            epoch: 1,
            leader: Some(leader),
            isr: vec![0, 1, 2],
            osr: vec![],
        }
    }

    #[test]
    fn a_live_leader_stays() {
        let state = led_by(member(0, 7));
        assert_eq!(elect(&state, &[candidate(0, 7, 5), candidate(1, 1, 9)]), None);
    }

    #[test]
    fn the_longest_intact_isr_member_leads_and_the_old_leader_leaves_the_isr() {
        let state = led_by(member(0, 7));
        let mut wiped = candidate(2, 1, 20);
        wiped.lost_data = true;
        let next = elect(&state, &[candidate(0, 8, 5), candidate(1, 1, 9), wiped]).unwrap();
        assert_eq!(next.leader, Some(member(1, 1)));
        assert_eq!(next.epoch, 2);
        assert_eq!(next.isr, vec![1, 2]);
        assert_eq!(next.osr, vec![0]);
        // The old leader restarted with its data: a new incarnation, so a new
        // epoch, but it may lead again (and stays in sync) when its log is
        // the longest.
        let again = elect(&state, &[candidate(0, 8, 30), candidate(1, 1, 9)]).unwrap();
        assert_eq!(
            (again.leader, again.epoch, again.isr.clone()),
            (Some(member(0, 8)), 2, vec![0, 1, 2])
        );
    }

    #[test]
    fn an_osr_replica_is_never_elected() {
        let mut state = led_by(member(0, 7));
        state.isr = vec![0];
        state.osr = vec![1, 2];
        let next = elect(&state, &[candidate(1, 1, 100), candidate(2, 1, 100)]).unwrap();
        assert_eq!(next.leader, None);
        assert_eq!(next.epoch, 2);
        assert_eq!(
            elect(&next, &[candidate(1, 1, 100)]),
            None,
            "nothing changes until an ISR member returns"
        );
        let back = elect(&next, &[candidate(0, 9, 3)]).unwrap();
        assert_eq!(back.leader, Some(member(0, 9)));
        assert_eq!(back.epoch, 3);
        assert_eq!(back.isr, vec![0]);
    }

    #[test]
    fn a_hand_off_keeps_the_old_leader_in_sync() {
        let state = led_by(member(0, 7));
        let next = hand_off(&state, &candidate(2, 4, 0)).unwrap();
        assert_eq!(
            (next.leader, next.epoch, next.isr.clone()),
            (Some(member(2, 4)), 2, vec![0, 1, 2])
        );
        let mut osr = state.clone();
        osr.isr = vec![0, 1];
        osr.osr = vec![2];
        assert_eq!(hand_off(&osr, &candidate(2, 4, 0)), None);
    }
}
