package audit

import "time"

// stamps formats times as time.RFC3339Nano does, keeping the formatting of
// the last second seen: an audit line has two times (now, and the token's
// expiry, the same for every caller of a token), and each changes its second
// far less often than lines are written. The Logger's lock guards it.
//
// It keeps the second's UTC offset, not its location: the offset is what the
// format depends on, and keeping no pointer from the time lets an event's
// strings stay on its writer's stack.
type stamps struct {
	sec    int64
	offset int
	valid  bool
	head   []byte // 2006-01-02T15:04:05
	zone   []byte // Z, or -07:00
}

// appendTime appends t as time.RFC3339Nano would.
func (s *stamps) appendTime(b []byte, t time.Time) []byte {
	sec := t.Unix()
	_, offset := t.Zone()
	if !s.valid || s.sec != sec || s.offset != offset {
		s.sec, s.offset, s.valid = sec, offset, true
		s.head = t.AppendFormat(s.head[:0], "2006-01-02T15:04:05")
		s.zone = t.AppendFormat(s.zone[:0], "Z07:00")
	}
	b = append(b, s.head...)
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
	return append(b, s.zone...)
}
