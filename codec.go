package micro

import (
	"bytes"
	"encoding/gob"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
)

// Codec turns messages into bytes and back for one content type. Servers pick
// the codec named by a request's Content-Type; clients send with the codec
// chosen by [ContentType] (default application/json).
//
// A Codec must be safe for concurrent use. Unmarshal must not keep data after
// it returns: the caller may reuse the buffer.
type Codec interface {
	// ContentType is the MIME type the codec speaks, without parameters:
	// "application/json". For streams, Connect's form is derived from it
	// ("application/connect+json").
	ContentType() string
	// Marshal encodes v.
	Marshal(v any) ([]byte, error)
	// Unmarshal decodes data into v, which is a pointer.
	Unmarshal(data []byte, v any) error
}

// The content types of the built-in codecs.
const (
	ContentTypeJSON  = "application/json"
	ContentTypeProto = "application/proto"
	ContentTypeGob   = "application/gob"
	ContentTypeBytes = "application/octet-stream"
	ContentTypeText  = "text/plain"
)

// JSONCodec encodes with encoding/json. An empty body decodes as an empty
// message, so `curl -d ”` calls an endpoint whose request has no fields.
type JSONCodec struct{}

// ContentType returns "application/json".
func (JSONCodec) ContentType() string { return ContentTypeJSON }

// Marshal encodes v as JSON.
func (JSONCodec) Marshal(v any) ([]byte, error) { return json.Marshal(v) }

// Unmarshal decodes JSON into v.
func (JSONCodec) Unmarshal(data []byte, v any) error {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil
	}
	return json.Unmarshal(data, v)
}

// ProtoCodec encodes protocol buffers through the messages' own methods: a
// value needs MarshalVT/UnmarshalVT (vtprotobuf) or Marshal/Unmarshal
// (gogo/protobuf and similar generators). For google.golang.org/protobuf
// messages, register a codec that calls proto.Marshal (see the Codec example);
// the core module does not import it.
type ProtoCodec struct{}

type (
	codecVTMarshaler   interface{ MarshalVT() ([]byte, error) }
	codecVTUnmarshaler interface{ UnmarshalVT([]byte) error }
	codecMarshaler     interface{ Marshal() ([]byte, error) }
	codecUnmarshaler   interface{ Unmarshal([]byte) error }
)

// ContentType returns "application/proto".
func (ProtoCodec) ContentType() string { return ContentTypeProto }

// Marshal encodes v with its MarshalVT or Marshal method.
func (ProtoCodec) Marshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case codecVTMarshaler:
		return m.MarshalVT()
	case codecMarshaler:
		return m.Marshal()
	}
	return nil, fmt.Errorf("micro: proto codec: %T has no Marshal() ([]byte, error) method; "+
		"use a generated type with one, or register a codec built on google.golang.org/protobuf", v)
}

// Unmarshal decodes data with v's UnmarshalVT or Unmarshal method.
func (ProtoCodec) Unmarshal(data []byte, v any) error {
	switch m := v.(type) {
	case codecVTUnmarshaler:
		return m.UnmarshalVT(data)
	case codecUnmarshaler:
		return m.Unmarshal(data)
	}
	return fmt.Errorf("micro: proto codec: %T has no Unmarshal([]byte) error method; "+
		"use a generated type with one, or register a codec built on google.golang.org/protobuf", v)
}

// GobCodec encodes with encoding/gob, each message self-describing. Gob is for
// Go peers that trust each other: encoding/gob is not hardened against hostile
// input. So a server accepts gob only when given WithCodec(GobCodec{});
// clients always can send it. The codec turns a decoder panic into an error,
// and the server's body limit bounds a message's size.
type GobCodec struct{}

// ContentType returns "application/gob".
func (GobCodec) ContentType() string { return ContentTypeGob }

// Marshal encodes v with gob.
func (GobCodec) Marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	if err := gob.NewEncoder(&b).Encode(v); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Unmarshal decodes gob data into v.
func (GobCodec) Unmarshal(data []byte, v any) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("micro: gob codec: malformed data: %v", r)
		}
	}()
	return gob.NewDecoder(bytes.NewReader(data)).Decode(v)
}

// BytesCodec passes raw bytes through: messages are []byte (or *[]byte).
type BytesCodec struct{}

// ContentType returns "application/octet-stream".
func (BytesCodec) ContentType() string { return ContentTypeBytes }

// Marshal returns v itself when it is a []byte or *[]byte.
func (BytesCodec) Marshal(v any) ([]byte, error) {
	switch b := v.(type) {
	case []byte:
		return b, nil
	case *[]byte:
		return *b, nil
	}
	return nil, fmt.Errorf("micro: bytes codec: cannot encode %T; use []byte", v)
}

// Unmarshal copies data into v, which must be a *[]byte.
func (BytesCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("micro: bytes codec: cannot decode into %T; use *[]byte", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

// TextCodec carries plain text: messages are string, *string or []byte.
type TextCodec struct{}

// ContentType returns "text/plain".
func (TextCodec) ContentType() string { return ContentTypeText }

// Marshal encodes a string, *string or []byte.
func (TextCodec) Marshal(v any) ([]byte, error) {
	switch s := v.(type) {
	case string:
		return []byte(s), nil
	case *string:
		return []byte(*s), nil
	case []byte:
		return s, nil
	case *[]byte:
		return *s, nil
	}
	return nil, fmt.Errorf("micro: text codec: cannot encode %T; use string", v)
}

// Unmarshal decodes into a *string or *[]byte.
func (TextCodec) Unmarshal(data []byte, v any) error {
	switch s := v.(type) {
	case *string:
		*s = string(data)
		return nil
	case *[]byte:
		*s = append((*s)[:0], data...)
		return nil
	}
	return fmt.Errorf("micro: text codec: cannot decode into %T; use *string", v)
}

// codecBuiltin holds the built-in codecs by content type, with the aliases
// other kits send. It is never written after init.
var codecBuiltin = map[string]Codec{
	ContentTypeJSON:          JSONCodec{},
	ContentTypeProto:         ProtoCodec{},
	"application/protobuf":   ProtoCodec{},
	"application/x-protobuf": ProtoCodec{},
	ContentTypeGob:           GobCodec{},
	ContentTypeBytes:         BytesCodec{},
	ContentTypeText:          TextCodec{},
}

// codecSet is a component's codecs: its own, then the built-in ones. A nil
// *codecSet holds just the built-in codecs.
type codecSet struct {
	byType map[string]Codec
	server bool // decodes what strangers send: gob only if added
}

func (s *codecSet) add(c Codec) {
	if s.byType == nil {
		s.byType = make(map[string]Codec)
	}
	s.byType[codecMediaType(c.ContentType())] = c
}

// get returns the codec for a Content-Type header value (parameters such as
// charset are ignored), or nil.
func (s *codecSet) get(contentType string) Codec {
	ct := codecMediaType(contentType)
	if s != nil {
		if c, ok := s.byType[ct]; ok {
			return c
		}
		if s.server && ct == ContentTypeGob {
			return nil
		}
	}
	return codecBuiltin[ct]
}

// names lists the content types the set accepts, for a 415 reply.
func (s *codecSet) names() string {
	seen := map[string]bool{}
	var out []string
	add := func(ct string) {
		if !seen[ct] {
			seen[ct] = true
			out = append(out, ct)
		}
	}
	for _, ct := range []string{ContentTypeJSON, ContentTypeProto, ContentTypeGob, ContentTypeBytes, ContentTypeText} {
		if s.get(ct) != nil {
			add(ct)
		}
	}
	if s != nil {
		for ct := range s.byType {
			add(ct)
		}
	}
	return strings.Join(out, ", ")
}

// codecMediaType lower-cases a Content-Type value and drops its parameters.
func codecMediaType(contentType string) string {
	if i := strings.IndexByte(contentType, ';'); i >= 0 {
		contentType = contentType[:i]
	}
	return strings.ToLower(strings.TrimSpace(contentType))
}

// codecNew returns a pointer to a new zero value of t (which is a pointer type
// or not), for decoding a message into.
func codecNew(t reflect.Type) reflect.Value {
	if t.Kind() == reflect.Pointer {
		return reflect.New(t.Elem())
	}
	return reflect.New(t)
}
