package audit

import (
	"sync/atomic"
	"time"
)

// stamp is one second at one UTC offset formatted in RFC 3339: the part up
// to the seconds and the zone. (The offset, not the location, is what the
// format depends on; and keeping no pointer from the time lets an event's
// strings stay on its writer's stack.)
type stamp struct {
	sec    int64
	offset int
	head   []byte // 2006-01-02T15:04:05
	zone   []byte // Z, or -07:00
}

// stamps formats times as time.RFC3339Nano does, keeping the formatting of
// the last second seen: an audit line has two times (now, and the token's
// expiry, the same for every caller of a token), and each changes its second
// far less often than lines are written. Safe for concurrent use.
type stamps struct {
	last atomic.Pointer[stamp]
}

// appendTime appends t as time.RFC3339Nano would.
func (s *stamps) appendTime(b []byte, t time.Time) []byte {
	sec := t.Unix()
	_, offset := t.Zone()
	st := s.last.Load()
	if st == nil || st.sec != sec || st.offset != offset {
		st = &stamp{sec: sec, offset: offset, head: t.AppendFormat(nil, "2006-01-02T15:04:05"), zone: t.AppendFormat(nil, "Z07:00")}
		s.last.Store(st)
	}
	b = append(b, st.head...)
	if ns := t.Nanosecond(); ns != 0 { // nine digits, trailing zeros dropped
		var frac [10]byte
		frac[0] = '.'
		for i := 9; i > 0; i-- {
			frac[i] = byte('0' + ns%10)
			ns /= 10
		}
		n := len(frac)
		for frac[n-1] == '0' {
			n--
		}
		b = append(b, frac[:n]...)
	}
	return append(b, st.zone...)
}
