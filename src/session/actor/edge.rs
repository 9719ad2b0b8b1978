//! The session at the edge's limits: its share of the buffer budget, the
//! budget's verdicts, and its turn in a drain (`server.drain_spread`).

use tokio::time::Instant;
use tracing::{debug, info};

use super::Session;
use crate::budget::Verdict;
use crate::cause::Cause;
use crate::session::link::Holder;
use crate::session::SessionEnd;

impl Session<'_> {
    /// The proxy is shutting down: the session closes its tabs (1001) now,
    /// or, with `server.drain_spread`, at its rank's moment in that window
    /// ([`crate::session::DrainOrder`]: evenly spaced), so that the
    /// clients' reconnects reach the fleet's other processes gradually. Its
    /// upstream closes once its tabs have.
    #[cold]
    pub(super) fn begin_shutdown(&mut self) -> Result<(), SessionEnd> {
        let spread = self.ctx.drain_spread;
        if spread.is_zero() || self.tabs.is_empty() {
            return Err(SessionEnd::Shutdown);
        }
        let wait = self.ctx.drain_order.next_moment(spread);
        debug!(
            ?wait,
            "shutting down: the tabs close after this share of drain_spread"
        );
        self.draining = true;
        self.linger = Some(Box::pin(tokio::time::sleep_until(Instant::now() + wait)));
        Ok(())
    }

    /// The buffer budget is spent and `holder` holds the most: it closes.
    #[cold]
    pub(super) fn evict(&mut self, holder: Holder) -> Result<(), SessionEnd> {
        let budget = &self.ctx.budget;
        match holder {
            Holder::Tab(tab) => {
                info!(tab = %tab, held = budget.held(), budget = budget.limit(), "buffer budget spent: closing the tab that holds the most");
                self.leave(tab, Cause::MemoryBudget)
            }
            Holder::Session => {
                info!(
                    held = budget.held(),
                    budget = budget.limit(),
                    "buffer budget spent: closing the session that holds the most"
                );
                Err(SessionEnd::MemoryBudget)
            }
        }
    }

    /// Reports the session's own holdings to the buffer budget: its
    /// reconnect buffer, what its envelope keeps (a `pusher` session's
    /// channels, a `graphql` session's operations), and `unwritten` bytes
    /// its upstream has not taken.
    pub(super) fn account(&mut self, unwritten: usize) -> Result<(), SessionEnd> {
        match self.report(unwritten) {
            Verdict::Fine => Ok(()),
            Verdict::CloseSelf => self.evict(Holder::Session),
        }
    }

    fn report(&mut self, unwritten: usize) -> Verdict {
        let buffered = self.uplink.buffered_bytes() + self.envelope.held();
        let holders = &self.tabs.holders;
        holders
            .budget
            .set(&mut self.charge, buffered + unwritten, || {
                holders.evictor(Holder::Session)
            })
    }
}
