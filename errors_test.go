package micro

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
)

func TestCodeNamesAndStatuses(t *testing.T) {
	want := map[Code][2]any{
		CodeCanceled: {"canceled", 499}, CodeUnknown: {"unknown", 500},
		CodeInvalidArgument: {"invalid_argument", 400}, CodeDeadlineExceeded: {"deadline_exceeded", 504},
		CodeNotFound: {"not_found", 404}, CodeAlreadyExists: {"already_exists", 409},
		CodePermissionDenied: {"permission_denied", 403}, CodeResourceExhausted: {"resource_exhausted", 429},
		CodeFailedPrecondition: {"failed_precondition", 400}, CodeAborted: {"aborted", 409},
		CodeOutOfRange: {"out_of_range", 400}, CodeUnimplemented: {"unimplemented", 501},
		CodeInternal: {"internal", 500}, CodeUnavailable: {"unavailable", 503},
		CodeDataLoss: {"data_loss", 500}, CodeUnauthenticated: {"unauthenticated", 401},
	}
	assertEqual(t, len(want), 16)
	for c, w := range want {
		assertEqual(t, c.String(), w[0].(string))
		assertEqual(t, c.HTTPStatus(), w[1].(int))
		back, ok := ParseCode(c.String())
		assertEqual(t, ok, true)
		assertEqual(t, back, c)
	}
	assertEqual(t, Code(99).String(), "code_99")
	assertEqual(t, Code(99).HTTPStatus(), 500)
	for _, c := range []Code{0, 7, 99} {
		b, _ := json.Marshal(c)
		var back Code
		assertNoError(t, json.Unmarshal(b, &back))
		assertEqual(t, back, c)
	}
	var c Code
	if json.Unmarshal([]byte(`"bogus"`), &c) == nil {
		t.Fatal("bogus code accepted")
	}
}

func TestCodeOfAndWrapping(t *testing.T) {
	base := errors.New("disk full")
	e := Errorf(CodeResourceExhausted, "writing: %w", base)
	assertEqual(t, e.Error(), "resource_exhausted: writing: disk full")
	if !errors.Is(e, base) {
		t.Fatal("Errorf does not wrap with %w")
	}
	wrapped := fmt.Errorf("outer: %w", e)
	assertEqual(t, CodeOf(wrapped), CodeResourceExhausted)
	assertEqual(t, CodeOf(nil), Code(0))
	assertEqual(t, CodeOf(base), CodeUnknown)
	assertEqual(t, CodeOf(context.Canceled), CodeCanceled)
	assertEqual(t, CodeOf(fmt.Errorf("x: %w", context.DeadlineExceeded)), CodeDeadlineExceeded)
	assertEqual(t, CodeOf(&Error{}), CodeUnknown)
	assertEqual(t, AsError(wrapped), e)
	assertEqual(t, AsError(base).Message, "disk full")
	if AsError(nil) != nil {
		t.Fatal("AsError(nil) is not nil")
	}
	for code := Code(1); code <= 16; code++ {
		got := errorCodeFromHTTP(code.HTTPStatus())
		if got == 0 {
			t.Fatalf("status %d maps to no code", code.HTTPStatus())
		}
	}
	assertEqual(t, errorCodeFromHTTP(404), CodeUnimplemented)
	assertEqual(t, errorCodeFromHTTP(502), CodeUnavailable)
	assertEqual(t, errorCodeFromHTTP(418), CodeUnknown)
}
