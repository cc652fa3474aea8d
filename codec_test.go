package micro

import (
	"strings"
	"testing"
)

func TestCodecLookupByContentType(t *testing.T) {
	var set *codecSet // nil: built-ins only
	for ct, want := range map[string]string{
		"application/json":                ContentTypeJSON,
		"Application/JSON; charset=utf-8": ContentTypeJSON,
		"application/protobuf":            ContentTypeProto,
		"application/x-protobuf":          ContentTypeProto,
		"application/gob":                 ContentTypeGob,
		"application/octet-stream":        ContentTypeBytes,
		" text/plain ;charset=utf-8":      ContentTypeText,
	} {
		c := set.get(ct)
		if c == nil || c.ContentType() != want {
			t.Errorf("%q: got %v, want %s", ct, c, want)
		}
	}
	if set.get("application/xml") != nil || set.get("") != nil {
		t.Fatal("unknown content types must find no codec")
	}
	custom := &codecSet{}
	custom.add(upperJSON{})
	assertEqual(t, custom.get(ContentTypeJSON).(upperJSON), upperJSON{}) // replaces the built-in
	if !strings.Contains(custom.names(), "application/json") {
		t.Fatal(custom.names())
	}
}

type upperJSON struct{ JSONCodec }

func TestCodecsRefuseWrongTypes(t *testing.T) {
	tests := []struct {
		codec Codec
		value any
	}{
		{BytesCodec{}, "a string"},
		{TextCodec{}, 42},
		{ProtoCodec{}, &HelloRequest{}},
	}
	for _, tt := range tests {
		if _, err := tt.codec.Marshal(tt.value); err == nil {
			t.Errorf("%T marshalled %T", tt.codec, tt.value)
		}
		if err := tt.codec.Unmarshal([]byte("x"), &struct{}{}); err == nil {
			t.Errorf("%T unmarshalled into a struct", tt.codec)
		}
	}
	// Unmarshal copies: the caller may reuse its buffer.
	buf := []byte("abc")
	var b []byte
	assertNoError(t, BytesCodec{}.Unmarshal(buf, &b))
	buf[0] = 'z'
	assertEqual(t, string(b), "abc")
	// An empty JSON body is an empty message.
	var req HelloRequest
	assertNoError(t, JSONCodec{}.Unmarshal([]byte("  "), &req))
	// Gob's panics on hostile input become errors.
	var m Msg
	if err := (GobCodec{}).Unmarshal([]byte{0x07, 0xff, 0x82, 0x01, 0x01, 0x01, 0x01, 0x01}, &m); err == nil {
		t.Fatal("garbage gob decoded")
	}
}

// FuzzCodecs feeds arbitrary bytes to every built-in decoder: errors are
// fine, panics are not.
func FuzzCodecs(f *testing.F) {
	f.Add([]byte(`{"Text":"a","Count":1}`))
	f.Add([]byte{0x0a, 0x01, 'a', 0x10, 0x01})
	f.Add([]byte{0x1f, 0xff, 0x81, 0x03, 0x01, 0x01, 0x03, 'M', 's', 'g'})
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, c := range []Codec{JSONCodec{}, ProtoCodec{}, GobCodec{}} {
			var m Msg
			c.Unmarshal(data, &m)
		}
		var b []byte
		BytesCodec{}.Unmarshal(data, &b)
		var s string
		TextCodec{}.Unmarshal(data, &s)
	})
}
