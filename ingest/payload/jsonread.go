package payload

import (
	"bytes"
	"fmt"
	"sync/atomic"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// jsonReader reads the two JSON payload shapes straight from the bytes,
// without reflection: it accepts exactly what encoding/json accepts for them
// (FuzzSenMLJSONAsStd and FuzzPlainJSONAsStd compare the two on the same
// input) and allocates only the strings the result keeps. It checks that
// strings are valid UTF-8; elsewhere only ASCII is grammar, so b is valid
// UTF-8 as far as the reader accepted it. Its errors say where it stopped;
// which reason a refused message gets is the caller's (see senmlError).
type jsonReader struct {
	b     []byte
	i     int
	depth int
	err   error
}

// maxJSONDepth is encoding/json's nesting limit.
const maxJSONDepth = 10000

func (r *jsonReader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf(format+" at offset %d", append(args, r.i)...)
	}
	r.i = len(r.b)
}

func (r *jsonReader) ws() {
	for r.i < len(r.b) {
		switch r.b[r.i] {
		case ' ', '\t', '\n', '\r':
			r.i++
		default:
			return
		}
	}
}

// peek returns the next byte after white space, 0 at the end.
func (r *jsonReader) peek() byte {
	r.ws()
	if r.i < len(r.b) {
		return r.b[r.i]
	}
	return 0
}

// expect consumes c (after white space) or fails.
func (r *jsonReader) expect(c byte) bool {
	if r.peek() != c {
		r.unexpected("want '" + string(c) + "'")
		return false
	}
	r.i++
	return true
}

func (r *jsonReader) unexpected(what string) {
	if r.i >= len(r.b) {
		r.fail("unexpected end of JSON input (%s)", what)
		return
	}
	r.fail("invalid character %q (%s)", r.b[r.i], what)
}

func (r *jsonReader) push() bool {
	r.depth++
	if r.depth > maxJSONDepth {
		r.fail("exceeded max depth")
		return false
	}
	return true
}

// literal consumes one of true, false, null (the first byte already seen).
func (r *jsonReader) literal(word string) bool {
	if !bytes.HasPrefix(r.b[r.i:], []byte(word)) {
		r.unexpected("in literal " + word)
		return false
	}
	r.i += len(word)
	return true
}

// number consumes a JSON number and returns its text and its decimal form.
func (r *jsonReader) number() ([]byte, decimal) {
	b, start := r.b, r.i
	i := r.i
	var d decimal
	if i < len(b) && b[i] == '-' {
		d.neg = true
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		i = d.digits(b, i, false)
	default:
		r.i = i
		r.unexpected("in numeric literal")
		return nil, d
	}
	if i < len(b) && b[i] == '.' {
		i++
		if j := d.digits(b, i, true); j > i {
			i = j
		} else {
			r.i = i
			r.unexpected("after decimal point in numeric literal")
			return nil, d
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		var ok bool
		if i, ok = d.exponent(b, i+1); !ok {
			r.i = i
			r.unexpected("in exponent of numeric literal")
			return nil, d
		}
	}
	r.i = i
	return b[start:i], d
}

// str consumes a JSON string and returns its contents: a slice of the input
// when it has no escapes, else a new slice holding it unescaped.
func (r *jsonReader) str() []byte {
	if r.peek() != '"' {
		r.unexpected("want a string")
		return nil
	}
	b := r.b
	start := r.i + 1
	ascii := true
	for i := start; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			if !ascii && !utf8.Valid(b[start:i]) {
				r.i = start
				r.fail("string is not valid UTF-8")
				return nil
			}
			r.i = i + 1
			return b[start:i]
		case c == '\\':
			return r.unescape(start, i)
		case c < 0x20:
			r.i = i
			r.unexpected("in string literal")
			return nil
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	r.i = len(b)
	r.unexpected("in string literal")
	return nil
}

// unescape decodes the string that starts at start and has its first escape
// at esc, as encoding/json does (a lone or invalid surrogate becomes U+FFFD).
func (r *jsonReader) unescape(start, esc int) []byte {
	b := r.b
	out := append(make([]byte, 0, esc-start+16), b[start:esc]...)
	i := esc
	for i < len(b) {
		c := b[i]
		switch {
		case c == '"':
			if !utf8.Valid(b[start:i]) {
				r.i = start
				r.fail("string is not valid UTF-8")
				return nil
			}
			r.i = i + 1
			return out
		case c < 0x20:
			r.i = i
			r.unexpected("in string literal")
			return nil
		case c != '\\':
			out = append(out, c)
			i++
			continue
		}
		if i+1 >= len(b) {
			break
		}
		switch e := b[i+1]; e {
		case '"', '\\', '/':
			out = append(out, e)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			rr, ok := hex4(b[i+2:])
			if !ok {
				r.i = min(i+2, len(b))
				r.unexpected("in \\u hexadecimal character escape")
				return nil
			}
			if utf16.IsSurrogate(rr) {
				if rr1, ok := hex4(b[min(i+8, len(b)):]); ok && b[i+6] == '\\' && b[i+7] == 'u' {
					if dec := utf16.DecodeRune(rr, rr1); dec != unicode.ReplacementChar {
						out = utf8.AppendRune(out, dec)
						i += 12
						continue
					}
				}
				rr = unicode.ReplacementChar
			}
			out = utf8.AppendRune(out, rr)
			i += 6
			continue
		default:
			r.i = i + 1
			r.unexpected("in string escape code")
			return nil
		}
		i += 2
	}
	r.i = len(b)
	r.unexpected("in string literal")
	return nil
}

// hex4 reads the 4 hex digits of a \u escape.
func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var v rune
	for _, c := range b[:4] {
		switch {
		case c >= '0' && c <= '9':
			c -= '0'
		case c >= 'a' && c <= 'f':
			c = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			c = c - 'A' + 10
		default:
			return 0, false
		}
		v = v<<4 | rune(c)
	}
	return v, true
}

// skip consumes any one value, checking its syntax and depth.
func (r *jsonReader) skip() {
	switch c := r.peek(); {
	case c == '"':
		r.str()
	case c == '-' || c >= '0' && c <= '9':
		r.number()
	case c == 't':
		r.literal("true")
	case c == 'f':
		r.literal("false")
	case c == 'n':
		r.literal("null")
	case c == '[':
		r.i++
		if !r.push() {
			return
		}
		if r.peek() == ']' {
			r.i++
			r.depth--
			return
		}
		for r.err == nil {
			r.skip()
			if r.peek() == ',' {
				r.i++
				continue
			}
			if r.expect(']') {
				r.depth--
			}
			return
		}
	case c == '{':
		r.object(func([]byte) { r.skip() })
	default:
		r.unexpected("looking for beginning of value")
	}
}

// object consumes an object (at '{'), calling field for each key with the
// reader at the value, which field must consume.
func (r *jsonReader) object(field func(key []byte)) {
	if !r.expect('{') || !r.push() {
		return
	}
	if r.peek() == '}' {
		r.i++
		r.depth--
		return
	}
	for r.err == nil {
		key := r.str()
		if !r.expect(':') {
			return
		}
		field(key)
		if r.peek() == ',' {
			r.i++
			continue
		}
		if r.expect('}') {
			r.depth--
		}
		return
	}
}

// float consumes a number (or null: ok false) as encoding/json decodes it
// into a *float64: a string, boolean, object or array fails.
func (r *jsonReader) float() (v float64, ok bool) {
	switch c := r.peek(); {
	case c == 'n':
		r.literal("null")
		return 0, false
	case c == '-' || c >= '0' && c <= '9':
		s, d := r.number()
		if r.err != nil {
			return 0, false
		}
		v, ok := atof(s, d)
		if !ok {
			r.fail("number %s does not fit a float64", s)
			return 0, false
		}
		return v, true
	}
	r.typeError("number")
	return 0, false
}

// text consumes a string (or null: ok false).
func (r *jsonReader) text() (s string, ok bool) {
	switch r.peek() {
	case 'n':
		r.literal("null")
		return "", false
	case '"':
		b := r.str()
		return intern(b), r.err == nil
	}
	r.typeError("string")
	return "", false
}

// typeError fails on a value of the wrong type (after checking its syntax, as
// encoding/json does, so that the message names the first real problem).
func (r *jsonReader) typeError(want string) {
	at := r.i
	r.skip()
	if r.err == nil {
		r.i = at
		r.fail("cannot decode %.20s into a %s", r.b[at:], want)
	}
}

// end checks that only white space follows.
func (r *jsonReader) end() {
	if r.ws(); r.i < len(r.b) {
		r.unexpected("after top-level value")
	}
}

// names caches the strings of recent names, units and states, so that the
// strings of a series are allocated once, not per message: a direct-mapped
// table (a slot per hash, the last string wins), lock-free and bounded.
var names [1024]atomic.Pointer[string]

// intern returns b as a string, from names when it is there.
func intern(b []byte) string {
	if len(b) > 64 {
		return string(b)
	}
	h := uint32(2166136261) // FNV-1a
	for _, c := range b {
		h ^= uint32(c)
		h *= 16777619
	}
	slot := &names[h%uint32(len(names))]
	if p := slot.Load(); p != nil && *p == string(b) {
		return *p
	}
	s := string(b)
	slot.Store(&s)
	return s
}
