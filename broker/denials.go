package broker

import "github.com/tokenbroker/tokenbroker/broker/audit"

// RecordDenial writes a denial to the audit trail aggregated per (who,
// outcome) — who is the caller identity, or the source address of a peer
// without one — and counts it (every denial, written or summarized). See
// audit.Logger.WriteDenial. Only refusals of who the peer is or what it may
// do belong here; token.issued never goes through it.
func (b *Broker) RecordDenial(who string, e audit.Event) error {
	if c := b.m.auditEvents[e.Event]; c != nil {
		c.Inc()
	}
	_, err := b.audit.WriteDenial(who, e)
	return err
}
