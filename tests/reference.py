"""Independent float64 references for the tests (they never call the code under test)."""
import torch


def star_loss_reference(x, s, tx, ts, row_labels, col_labels, scale, mask=True):
    """Row by row: keep only the columns of other classes (all when ``mask`` is off), softmax
    over them for student and teacher, KL(teacher ‖ student); rows with nothing left give 0;
    the mean over rows."""
    x, s, tx, ts = (t.double() for t in (x, s, tx, ts))
    total = (x * 0).sum() + (s * 0).sum()  # 0, but connected to both inputs for autograd
    for i in range(x.shape[0]):
        keep = [j for j in range(s.shape[0]) if not mask or int(col_labels[j]) != int(row_labels[i])]
        if not keep:
            continue
        student = torch.stack([scale * torch.dot(x[i], s[j]) for j in keep])
        teacher = torch.stack([scale * torch.dot(tx[i], ts[j]) for j in keep])
        p = torch.exp(teacher - teacher.max()) / torch.exp(teacher - teacher.max()).sum()
        log_q = student - student.max() - torch.log(torch.exp(student - student.max()).sum())
        total = total + (p * (torch.log(p) - log_q)).sum()
    return total / x.shape[0]


def clip_loss_reference(img, txt, scale):
    """Symmetric InfoNCE over matching rows, float64."""
    img, txt = img.double(), txt.double()
    logits = scale * img @ txt.T
    n = logits.shape[0]
    loss_i = -(torch.diag(logits) - torch.logsumexp(logits, dim=1)).sum() / n
    loss_t = -(torch.diag(logits) - torch.logsumexp(logits, dim=0)).sum() / n
    return (loss_i + loss_t) / 2
